"""Routing plugins: scorers in [0, 1] weighted into one score per candidate, and a picker."""
