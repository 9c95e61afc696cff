"""loadtest's layout: no import cycles between its modules (a cycle hides in function-level
imports too, as bench.py ↔ bench_cli.py once did), and the older `python -m loadtest.sim_fleet`
still runs the fleet that moved to loadtest/sim/fleet.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"


def _module_name(path: Path) -> str:
    parts = path.relative_to(LOADTEST.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """loadtest module → the loadtest modules it imports, anywhere in its body."""
    paths = {_module_name(p): p for p in LOADTEST.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in paths and t != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_loadtest_modules_import_no_cycle():
    graph = import_graph()
    assert "loadtest.bench_setup" in graph["loadtest.bench"] and "loadtest.sim.engine" in graph["loadtest.sim.worker"]  # the graph sees both kinds
    assert find_cycle(graph) is None


def test_the_older_fleet_command_still_runs_the_fleet():
    result = subprocess.run([sys.executable, "-m", "loadtest.sim_fleet", "--help"], capture_output=True, text=True, timeout=60, check=False,
                            cwd=LOADTEST.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--decode" in result.stdout and "python -m loadtest.sim.fleet" in result.stdout
