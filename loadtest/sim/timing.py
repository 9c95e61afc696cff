"""TimingModel: how long a simulated worker's engine step and KV pull take, instead of running a model.

A real engine step runs every scheduled token through the model once (continuous batching: decodes
and prefill chunks share the step), so its time is a sum of what the step holds:

    step = step_base_s                                   scheduling, sampling, kernel launches
         + prefill_s_per_token        × prefill tokens   the matmuls (only tokens *not* cached)
         + prefill_s_per_token_context × Σ context       prefill attention: each new token attends
                                                           to every earlier one (token × context pairs)
         + decode_s_per_seq           × decode seqs      a decode row through the matmuls
         + decode_s_per_seq_context   × Σ context        decode attention reads each sequence's KV

    pull  = kv_transfer_base_s + kv_transfer_s_per_block × missing blocks     (0 when none are missing)

The defaults were fitted by `benchmarks/calibrate_sim_timing.py` on the real engine (see DEFAULTS
below for the command, date and machine). `scaled(x)` multiplies every time (x < 1: a faster
machine); `instant()` makes every step and pull take no time, for measuring the gateway alone.
Values are immutable; nothing here mutates.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

# Calibrated with
#   .venv/bin/python -m benchmarks.calibrate_sim_timing --out results/sim_timing.json
# on 2026-11-22 (2 cores, AMD Zen 4, 1 torch thread, SmolLM2-135M fp32, the default model, as a
# worker runs under `tandem up`): median error 5% over 60 measured steps; decode at batch 8 is
# ~27% slower than this linear model says and batch 32 ~15% faster (the engine's small-batch
# kernel covers up to 8 rows). KV transfer from docs/benchmarks.md ("KV transfer, prefill →
# decode"): Tandem's UCX pull moves ~4.25 GB/s and a block of that model is 720 KiB (30 layers ×
# 2 × 3 KV heads × 16 tokens × 64 dims × 4 bytes) → ~0.17 ms a block, plus ~5 ms a pull (the
# 64-block pull took 15.4 ms, the 1,024-block one 176 ms).
DEFAULTS = {
    "step_base_s": 0.0165,
    "prefill_s_per_token": 2.31e-3,
    "prefill_s_per_token_context": 8.82e-7,
    "decode_s_per_seq": 4.30e-3,
    "decode_s_per_seq_context": 2.20e-6,
    "kv_transfer_base_s": 0.005,
    "kv_transfer_s_per_block": 1.73e-4,
}

_TIME_FIELDS = tuple(DEFAULTS)


@dataclass(frozen=True)
class TimingModel:
    step_base_s: float = DEFAULTS["step_base_s"]
    prefill_s_per_token: float = DEFAULTS["prefill_s_per_token"]
    prefill_s_per_token_context: float = DEFAULTS["prefill_s_per_token_context"]
    decode_s_per_seq: float = DEFAULTS["decode_s_per_seq"]
    decode_s_per_seq_context: float = DEFAULTS["decode_s_per_seq_context"]
    kv_transfer_base_s: float = DEFAULTS["kv_transfer_base_s"]
    kv_transfer_s_per_block: float = DEFAULTS["kv_transfer_s_per_block"]
    max_num_batched_tokens: int = 2048  # chunked-prefill token budget per step (the workers' default)
    max_num_seqs: int = 128  # sequences running at once (the workers' default)

    def __post_init__(self):
        for name in _TIME_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0 (seconds), got {value!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    # ---- what things cost (do not mutate) -------------------------------------------------------

    def step_seconds(self, num_prefill_tokens: int, num_decode_seqs: int, prefill_context: int = 0, decode_context: int = 0) -> float:
        """One engine step computing `num_prefill_tokens` prompt tokens (chunks of any requests) and
        one token for each of `num_decode_seqs` sequences. `prefill_context`: Σ over the prefill
        tokens of how many tokens each attends to (see `prefill_pairs`); `decode_context`: Σ over the
        decoding sequences of their lengths. An empty step costs nothing."""
        if not num_prefill_tokens and not num_decode_seqs:
            return 0.0
        return (
            self.step_base_s
            + self.prefill_s_per_token * num_prefill_tokens
            + self.prefill_s_per_token_context * prefill_context
            + self.decode_s_per_seq * num_decode_seqs
            + self.decode_s_per_seq_context * decode_context
        )

    def pull_seconds(self, num_blocks: int) -> float:
        """A decode worker's pull of `num_blocks` KV blocks it lacks (0 when it lacks none)."""
        return self.kv_transfer_base_s + self.kv_transfer_s_per_block * num_blocks if num_blocks > 0 else 0.0

    @staticmethod
    def prefill_pairs(num_computed: int, num_new: int) -> int:
        """(token, context) pairs of a prefill chunk of `num_new` tokens after `num_computed` cached
        or computed ones: token j of the chunk attends to num_computed + j + 1 tokens."""
        return num_new * num_computed + num_new * (num_new + 1) // 2

    # ---- variants (new objects) -----------------------------------------------------------------

    def scaled(self, factor: float) -> TimingModel:
        """Every time × `factor` (0.5: a machine twice as fast; 0: instant). Limits are kept."""
        if not factor >= 0:
            raise ValueError(f"time scale must be >= 0, got {factor!r}")
        return dataclasses.replace(self, **{name: getattr(self, name) * factor for name in _TIME_FIELDS})

    @classmethod
    def instant(cls, **limits) -> TimingModel:
        """Steps and pulls take no time (the engine still schedules, caches and emits events): for
        benchmarks of the gateway itself. `limits`: max_num_batched_tokens, max_num_seqs."""
        return cls(**dict.fromkeys(_TIME_FIELDS, 0.0), **limits)

    # ---- files ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> TimingModel:
        """Fields by name; missing ones keep their defaults. Raises ValueError on an unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown timing setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TimingModel:
        """Read a .json or .toml file. In JSON the fields may sit under a "timing" key (the form
        benchmarks/calibrate_sim_timing.py writes, beside its measurements)."""
        path = Path(path)
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
        if isinstance(data.get("timing"), dict):
            data = data["timing"]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
