"""Fit the simulated workers' TimingModel (loadtest/sim/timing.py) to the real engine on this machine.

    .venv/bin/python -m benchmarks.calibrate_sim_timing --out results/sim_timing.json

Runs the real EngineCore as a worker runs it under `tandem up` (the default model, SmolLM2-135M fp32,
1 torch thread, 2,048-token step budget) and times single engine steps of known composition:
  - prefill of an uncached prompt, 128 … 2,048 tokens (one step each);
  - prefill of 128 / 256 new tokens after a cached prefix of 768 … 1,792 tokens (attention cost);
  - decode steps at batch 1 … 32 with ~130 tokens of context, and at batch 1, 8, 16 with ~1,040
    (prompts share a cached prefix, so building the batches costs little).
Each step becomes a row [1, prefill tokens, prefill token×context pairs, decode seqs, decode context]
and the five TimingModel coefficients are a least-squares fit of the step times, weighted by 1/time
(relative error: steps range from ~20 ms to seconds), with coefficients that come out negative
dropped to 0 and the rest refitted. It prints the fit, each step's measured and predicted time,
and writes the TimingModel (under "timing") with the observations to --out, which
`TimingModel.load` and `python -m loadtest.sim.fleet --timing FILE` read. About two minutes.
Imports torch and the engine (the simulated workers themselves never do).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

from loadtest.run_info import cpu_model
from loadtest.sim.timing import TimingModel

COLUMNS = ("step_base_s", "prefill_s_per_token", "prefill_s_per_token_context", "decode_s_per_seq", "decode_s_per_seq_context")


class Calibrator:
    def __init__(self, model: str, threads: int, kv_cache_gb: float, reps: int, seed: int = 0):
        from services.engine.engine_config import EngineConfig
        from services.engine.engine_core import EngineCore

        self.core = EngineCore(EngineConfig(model=model, num_threads=threads, kv_cache_memory_gb=kv_cache_gb, max_num_batched_tokens=2048))
        self.block_size = self.core.config.block_size
        self.vocab = self.core.model_config.vocab_size
        self.reps = reps
        self.rng = random.Random(seed)
        self.rows: list[dict] = []
        self._n = 0

    def _ids(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab - 100) for _ in range(n)]

    def _params(self, max_tokens: int):
        from services.engine.sampling_params import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        self._n += 1
        rid = f"cal-{self._n}"
        self.core.add_request(rid, prompt, self._params(max_tokens))
        return rid

    def _timed_step(self) -> float:
        t0 = time.perf_counter()
        self.core.step()
        return time.perf_counter() - t0

    def _drain(self) -> None:
        while self.core.has_work():
            self.core.step()

    def _record(self, kind: str, seconds: float, prefill: int = 0, prefill_ctx: int = 0, decode: int = 0, decode_ctx: int = 0) -> None:
        self.rows.append({"kind": kind, "seconds": seconds, "prefill_tokens": prefill, "prefill_context": prefill_ctx,
                          "decode_seqs": decode, "decode_context": decode_ctx})  # fmt: skip

    def warm_up(self) -> None:
        self._add(self._ids(64), 4)
        self._drain()

    def prefill_uncached(self, lengths: list[int]) -> None:
        for n in lengths:
            for _ in range(self.reps if n <= 1024 else 1):
                self._add(self._ids(n), 1)
                seconds = self._timed_step()
                self._drain()
                self._record("prefill", seconds, n, TimingModel.prefill_pairs(0, n))
                print(f"  prefill {n:5d} uncached tokens: {seconds * 1000:8.1f} ms", flush=True)

    def prefill_after_prefix(self, cases: list[tuple[int, int]]) -> None:
        for cached, new in cases:
            prefix = self._ids(cached)
            self._add(prefix + self._ids(self.block_size), 1)  # puts the prefix's blocks in the cache
            self._drain()
            for _ in range(self.reps):
                self._add(prefix + self._ids(new), 1)
                seconds = self._timed_step()
                self._drain()
                self._record("prefill+prefix", seconds, new, TimingModel.prefill_pairs(cached, new))
                print(f"  prefill {new:5d} tokens after {cached} cached: {seconds * 1000:8.1f} ms", flush=True)

    def decode(self, batches: list[int], context: int, steps: int) -> None:
        prefix = self._ids(context - self.block_size)
        self._add(prefix + self._ids(self.block_size), 1)  # the shared prefix into the cache first
        self._drain()
        for batch in batches:
            for _ in range(batch):
                self._add(prefix + self._ids(self.block_size), steps + 2)
            while any(not r.output_token_ids for r in self.core.requests.values()):  # every prompt prefilled
                self.core.step()
            times, lengths = [], []
            for _ in range(steps):
                lengths.append(sum(r.num_tokens for r in self.core.scheduler.running))
                times.append(self._timed_step())
            self._drain()
            for seconds, ctx in zip(times, lengths):
                self._record("decode", seconds, decode=batch, decode_ctx=ctx)
            print(f"  decode batch {batch:3d}, context ~{context}: {statistics.median(times) * 1000:8.1f} ms/step (median of {steps})", flush=True)


def fit(rows: list[dict]) -> dict[str, float]:
    """Weighted least squares (relative error), coefficients kept >= 0 by dropping negative ones."""
    x = np.array([[1.0, r["prefill_tokens"], r["prefill_context"], r["decode_seqs"], r["decode_context"]] for r in rows])
    y = np.array([r["seconds"] for r in rows])
    w = 1.0 / y
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all():
            break
        active = [c for c, v in zip(active, coef) if v >= 0]
    full = dict.fromkeys(COLUMNS, 0.0)
    for c, v in zip(active, coef):
        full[COLUMNS[c]] = float(v)
    return full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (workers under `tandem up` on 2 cores run 1 each)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each prefill measurement")
    ap.add_argument("--decode-steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter measurements (a smoke run)")
    ap.add_argument("--out", default=None, help="write the fitted TimingModel and the observations here (JSON)")
    args = ap.parse_args()

    import torch

    w0, c0 = time.perf_counter(), time.process_time()
    cal = Calibrator(args.model, args.threads, args.kv_cache_gb, 1 if args.quick else args.reps)
    cal.warm_up()
    print(f"model {args.model}, {cal.core.dtype}, {args.threads} torch thread(s), block size {cal.block_size}", flush=True)
    cal.prefill_uncached([128, 256, 512] if args.quick else [128, 256, 512, 1024, 2048])
    cal.prefill_after_prefix([(768, 128)] if args.quick else [(768, 128), (1792, 128), (1792, 256)])
    cal.decode([1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32], 128, args.decode_steps)
    cal.decode([8] if args.quick else [1, 8, 16], 1040, args.decode_steps)
    coef = fit(cal.rows)
    timing = TimingModel(**coef)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0

    print("\nfitted TimingModel:")
    for k, v in coef.items():
        print(f"  {k:30s} {v:.3e}")
    print(f"\n{'kind':16s} {'prefill':>8s} {'pairs':>10s} {'decode':>7s} {'ctx':>7s} {'measured ms':>12s} {'model ms':>10s} {'error':>7s}")
    errors = []
    for r in cal.rows:
        pred = timing.step_seconds(r["prefill_tokens"], r["decode_seqs"], r["prefill_context"], r["decode_context"])
        err = pred / r["seconds"] - 1
        errors.append(abs(err))
        print(f"{r['kind']:16s} {r['prefill_tokens']:8d} {r['prefill_context']:10d} {r['decode_seqs']:7d} {r['decode_context']:7d} "
              f"{r['seconds'] * 1000:12.1f} {pred * 1000:10.1f} {err:+7.1%}")  # fmt: skip
    print(f"\nmedian |error| {statistics.median(errors):.1%}, max {max(errors):.1%}; {wall:.0f} s wall, {cpu:.0f} s CPU")
    if args.out:
        report = {
            "timing": timing.to_dict(),
            "observations": cal.rows,
            "median_abs_error": statistics.median(errors),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                        "model": args.model, "dtype": str(cal.core.dtype), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
            "wall_s": wall,
            "cpu_s": cpu,
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
