"""The side-by-side benchmark's report: its Markdown tables and its picture hold what the run measured."""

from __future__ import annotations

import struct

import pytest

from benchmarks.vs_vllm import markdown
from benchmarks.vs_vllm_plot import plot_summary


def sweep_point(rate: float, tok_s: float, p99: float) -> dict:
    return {"rate": rate, "output_throughput": tok_s, "median_ttft_ms": p99 / 2, "p99_ttft_ms": p99, "median_tpot_ms": 40.0, "median_itl_ms": 30.0}


SWEEP_ONLY = {
    "dtype": "float32",
    "date": "2026-12-07 15:45:19 UTC",
    "served": {
        "vllm": {"sweep": {"points": [sweep_point(0.5, 57, 695), sweep_point(1.0, 111, 1081)]}},
        "tandem-default": {"sweep": {"points": [sweep_point(0.5, 57, 1026), sweep_point(1.0, 114, 974)]}},
    },
}
BURST = {"output_throughput": 375.0, "median_ttft_ms": 5794.0, "p99_ttft_ms": 11069.0, "median_tpot_ms": 125.0, "median_itl_ms": 87.0}
OFFLINE = {"output_tok_per_s": 400.0, "wall_s": 20.5, "machine_cpu_s": 41.0, "batch1_decode_ms_per_token": 9.2}


def test_markdown_has_a_row_per_server_and_rate_of_the_sweep():
    text = markdown(SWEEP_ONLY)
    assert "| vllm | 0.5 | 57 | 348 | 695 | 40 | 30 |" in text
    assert "| tandem-default | 0.5 | 57 | 513 | 1026 | 40 | 30 |" in text
    assert "| tandem-default | 1 | 114 | 487 | 974 | 40 | 30 |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| vllm |", "| tandem-default |"))]
    assert len(rows) == 4  # rates in order, each server under each rate
    assert [r.split(" | ")[1] for r in rows] == ["0.5", "0.5", "1", "1"]


def png_width(path) -> int:
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", header[16:20])[0]


@pytest.mark.parametrize(
    ("summary", "panels"),
    [
        (SWEEP_ONLY, 1),  # no burst and no offline run: the sweep alone, no empty axes beside it
        ({"dtype": "bfloat16", "date": "d", "offline": {"tandem": OFFLINE}, "served": {"tandem-default": {"burst": BURST}}}, 2),
        (
            {
                **SWEEP_ONLY,
                "offline": {"tandem": OFFLINE},
                "served": {**SWEEP_ONLY["served"], "tandem-default": {"burst": BURST, **SWEEP_ONLY["served"]["tandem-default"]}},
            },
            3,
        ),
    ],
    ids=["sweep-only", "offline-and-burst", "everything"],
)
def test_the_picture_draws_only_the_panels_the_run_has_data_for(tmp_path, summary, panels):
    path = tmp_path / "summary.png"
    plot_summary(summary, path)
    assert png_width(path) == 5 * panels * 110  # 5 inches a panel at 110 dpi
