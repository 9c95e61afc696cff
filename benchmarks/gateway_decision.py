"""The gateway's scheduling decision: latency of choosing a request's workers, at 100 and 1,000
workers with 1M indexed blocks.

    python -m benchmarks.gateway_decision [--workers 100 1000] [--decisions 5000]

One decision is what the gateway's routing step (gateway/routing_step.py) does per request: hash the prompt's blocks
(kvtransfer.block_hash, as the gateway does), run the routing policy over every registered
worker (role, health, model and overload filters; prefix affinity, queue depth, KV usage,
in-flight and session scorers; max-score picker), then the P/D decider (the chosen decode
worker's uncached tokens, and a prefill worker by its prefix hits and backlog). The prefix index
is the real one, filled with 1M (hash, worker) entries through KVEventBatch messages as the
workers' Watch streams deliver them: every worker holds random blocks plus, for one in ten, a
prefix of one of 32 shared 2,000-token system prompts. Worker handles carry random load
snapshots (running, waiting, KV usage, prefill backlog) that change between decisions. A tenth
of the workers are prefill workers. Requests: a random group's system prompt + a 200-token
question; half carry a session id.

Reported: p50 / p99 / mean of the decision (with and without hashing), and per plugin.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

from gateway.pd_decider import decide
from gateway.prefix_index import PrefixIndex
from gateway.scheduling.base import RequestContext
from gateway.scheduling.router import Router
from gateway.scheduling.scheduling_config import SchedulingConfig
from kvtransfer.block_hash import hash_blocks
from protos.tandem.v1 import gateway_pb2, worker_pb2

ENTRIES = 1_000_000
BLOCK_SIZE = 16
MODEL_ID = "bench-model"
GROUPS, SYSTEM_TOKENS, QUESTION_TOKENS = 32, 2000, 200


@dataclass
class _Registration:
    model: str = MODEL_ID


@dataclass
class BenchWorker:
    """The attributes of a gateway WorkerHandle that the scheduler reads."""

    worker_id: str
    role: str
    load: worker_pb2.LoadSnapshot
    registration: _Registration = field(default_factory=_Registration)
    connected: bool = True
    retired: bool = False
    num_in_flight: int = 0
    num_in_flight_tokens: int = 0
    key: str = ""


def build(num_workers: int, system_prompts: list[list[int]], rng: random.Random) -> tuple[PrefixIndex, list[BenchWorker]]:
    index = PrefixIndex(max_entries=ENTRIES + 1)
    workers = []
    per = ENTRIES // num_workers
    for w in range(num_workers):
        role = "prefill" if w % 10 == 9 else "decode"
        wid = f"{role}-{w:04d}"
        hashes = [rng.getrandbits(64) for _ in range(per)]
        if rng.random() < 0.1:  # holds (a prefix of) one group's system prompt
            group = hash_blocks(rng.choice(system_prompts), BLOCK_SIZE, MODEL_ID)
            k = rng.randint(1, len(group))
            hashes[:k] = group[:k]
        events = [worker_pb2.KVEvent(stored=worker_pb2.BlocksStored(block_hashes=hashes[i : i + 128])) for i in range(0, per, 128)]
        assert index.apply(wid, worker_pb2.KVEventBatch(sequence=1, events=events))
        workers.append(BenchWorker(wid, role, worker_pb2.LoadSnapshot(worker_id=wid), key=wid))
    return index, workers


def jiggle(workers: list[BenchWorker], rng: random.Random) -> None:
    """New load snapshots for a few workers, as the Watch streams would deliver between requests."""
    for w in rng.sample(workers, max(1, len(workers) // 20)):
        w.load = worker_pb2.LoadSnapshot(
            worker_id=w.worker_id, num_requests_running=rng.randint(0, 32), num_requests_waiting=rng.randint(0, 8),
            kv_cache_usage=rng.random(), num_pending_prefill_tokens=rng.randint(0, 8000) if w.role == "prefill" else 0,
        )  # fmt: skip
        w.num_in_flight = rng.randint(0, 4)


def run(num_workers: int, num_decisions: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    system_prompts = [[rng.randrange(49152) for _ in range(SYSTEM_TOKENS)] for _ in range(GROUPS)]
    gc.collect()
    index, workers = build(num_workers, system_prompts, rng)
    jiggle(workers, rng)
    router = Router(SchedulingConfig(), index, random.Random(seed))
    plugin_times: dict[str, list[float]] = defaultdict(list)
    observe = lambda name, sec: plugin_times[name].append(sec)  # noqa: E731
    with_hash, without_hash = [], []
    gc.disable()  # a collection of the 1M-entry index would land in one sample; the gateway's is rare
    try:
        for i in range(num_decisions + 200):
            prompt = rng.choice(system_prompts) + [rng.randrange(49152) for _ in range(QUESTION_TOKENS)]
            session = f"s{rng.randrange(1000)}" if rng.random() < 0.5 else ""
            jiggle(workers, rng)
            t0 = time.perf_counter()
            ctx = RequestContext(f"r{i}", len(prompt), hash_blocks(prompt, BLOCK_SIZE, MODEL_ID), BLOCK_SIZE, MODEL_ID, session)
            t1 = time.perf_counter()
            decode = router.pick(ctx, workers, observe=observe if i >= 200 else None)
            decide(gateway_pb2.SERVING_MODE_AUTO, ctx, decode, workers, router, observe=observe if i >= 200 else None)
            t2 = time.perf_counter()
            if i >= 200:  # warm-up excluded
                with_hash.append(t2 - t0)
                without_hash.append(t2 - t1)
    finally:
        gc.enable()
    index.check_integrity()
    return {"workers": num_workers, "entries": index.num_entries, "with_hash": with_hash, "without_hash": without_hash, "plugins": plugin_times}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--decisions", type=int, default=5000)
    args = parser.parse_args()
    for n in args.workers:
        r = run(n, args.decisions)
        print(f"\n{n} workers, {r['entries']:,} indexed (hash, worker) entries, {args.decisions} decisions (ms)")
        print(f"  {'':28s} {'p50':>8s} {'p99':>8s} {'mean':>8s}")
        for label, samples in (("decision incl. hashing", r["with_hash"]), ("decision (hashes given)", r["without_hash"])):
            print(f"  {label:28s} {pct(samples, 0.5):8.3f} {pct(samples, 0.99):8.3f} {statistics.mean(samples) * 1e3:8.3f}")
        for name, samples in sorted(r["plugins"].items(), key=lambda kv: -statistics.mean(kv[1])):
            print(f"    {name:26s} {pct(samples, 0.5):8.3f} {pct(samples, 0.99):8.3f} {statistics.mean(samples) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
