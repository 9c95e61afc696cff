"""`python -m loadtest.sim_fleet`: the older spelling of `python -m loadtest.sim.fleet` (loadtest/sim/fleet.py)."""

if __name__ == "__main__":
    from loadtest.sim.fleet import main

    main()
