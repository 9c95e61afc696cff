"""`tandem bench compare A.json B.json ...`: several results side by side, as one table and one plot.

The usual use is one workload against differently configured deployments (routing policies,
aggregated vs disaggregated, worker counts): run `tandem bench` once per configuration with a
--label, then compare. Runs become table columns; a sweep contributes one column per point
("label@4"). The plot overlays latency CDFs, or, when every file is a sweep, the sweep curves.
vLLM `bench serve` result files can be compared too (same field names; no per-request arrays
means no CDF for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from .report import compare_table, fmt_number, print_table
from .result import load_result


def labelled(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    """(label, result) per file: --labels, else the result's own label, else the file name; unique."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} files: give one label per file")
    out: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for i, path in enumerate(paths):
        result = load_result(path)
        if labels:
            label = labels[i]
        else:  # out/result.json is named by its directory
            label = result.get("label") or (Path(path).parent.name if Path(path).name == "result.json" else Path(path).stem)
        while label in seen:
            label = f"{label}#{i + 1}"
        seen.add(label)
        out.append((label, result))
    return out


def runs_of(results: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Every run, a sweep expanded into its points."""
    runs = []
    for label, result in results:
        if result.get("kind") == "sweep":
            variable = result["sweep"]["variable"]
            runs += [(f"{label}@{fmt_number(run['load'].get(variable))}", run) for run in result["runs"]]
        else:
            runs.append((label, result))
    return runs


def compare(paths: Sequence[Path], labels: Sequence[str] | None, out_dir: Path | None, plots: bool = True, console: Console | None = None) -> list[Path]:
    """Print the comparison table; write the plot into out_dir. Returns the files written."""
    results = labelled(paths, labels)
    runs = runs_of(results)
    print_table(compare_table(runs), console)
    written: list[Path] = []
    if out_dir is not None and plots:
        from .plots import plot_latency_cdfs, plot_sweep

        sweeps = [(label, r) for label, r in results if r.get("kind") == "sweep"]
        if sweeps and len(sweeps) == len(results) and len({s["sweep"]["variable"] for _, s in sweeps}) == 1:
            written.append(plot_sweep(sweeps, out_dir / "compare_sweep.png"))
        else:
            written.append(plot_latency_cdfs(runs, out_dir / "compare_latency_cdf.png"))
    return written
