"""SimFleet: many simulated workers in one process and one event loop, for the gateway's tests and
benchmarks (routing quality with a handful of workers, decision latency with a thousand).

    python -m loadtest.sim.fleet --etcd 127.0.0.1:2379 --cluster default --decode 8 --prefill 2
        [--model default --model-id ID --block-size 16 --num-kv-blocks 1456 --max-model-len 8192
         --timing FILE --time-scale X --instant --lease-ttl 10 --id-prefix sim --json]

prints one line, `ready N workers` (with --json: a JSON object with every worker's role, id and
address), once every worker is registered and SERVING, and runs until SIGTERM/SIGINT, when it
stops them all (each revokes its lease, so the gateway drops them at once) and exits 0.

Each worker has its own gRPC server (an idle grpc.aio server costs ~60 KB; a thousand start in a
fraction of a second) and its own etcd lease, as real workers do: the gateway sees exactly what it
would see from N processes. Workers start in parallel, a bounded number at a time, so etcd is not
flooded. Idle engines await an event, so an idle fleet uses no CPU beyond lease keep-alives
(one refresh per worker every lease_ttl/3 seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time

from .timing import TimingModel
from .worker import SimWorker, SimWorkerConfig

log = logging.getLogger(__name__)

START_CONCURRENCY = 64  # workers registering at once


class SimFleet:
    """N decode + M prefill SimWorkers sharing one config template. Event-loop only."""

    def __init__(self, etcd: str, cluster: str = "default", num_decode: int = 1, num_prefill: int = 0, id_prefix: str = "sim", **worker_settings):
        """`worker_settings`: any SimWorkerConfig field (timing, block_size, num_kv_blocks, ...)."""
        if num_decode < 0 or num_prefill < 0 or num_decode + num_prefill == 0:
            raise ValueError(f"a fleet needs at least one worker (got --decode {num_decode}, --prefill {num_prefill})")
        roles = [("prefill", i) for i in range(num_prefill)] + [("decode", i) for i in range(num_decode)]
        self.workers = [
            SimWorker(SimWorkerConfig(role=role, worker_id=f"{id_prefix}-{role}-{i}", etcd=etcd, cluster=cluster, **worker_settings)) for role, i in roles
        ]
        self.started = False

    def __len__(self) -> int:
        return len(self.workers)

    def role(self, role: str) -> list[SimWorker]:
        return [w for w in self.workers if w.role == role]

    @property
    def decode(self) -> list[SimWorker]:
        return self.role("decode")

    @property
    def prefill(self) -> list[SimWorker]:
        return self.role("prefill")

    @property
    def addresses(self) -> dict[str, str]:
        """worker id → host:port."""
        return {w.worker_id: w.address for w in self.workers}

    def worker(self, worker_id: str) -> SimWorker:
        return next(w for w in self.workers if w.worker_id == worker_id)

    async def start(self, concurrency: int = START_CONCURRENCY, timeout: float = 120.0) -> None:
        """Start and register every worker; on any failure stop those started and raise."""
        gate = asyncio.Semaphore(concurrency)

        async def start_one(w: SimWorker) -> None:
            async with gate:
                await w.start()

        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(start_one(w) for w in self.workers))
        except BaseException:
            await self.stop()
            raise
        self.started = True

    async def stop(self, concurrency: int = START_CONCURRENCY) -> None:
        """Stop every worker (lease revoked, server drained, engine closed). Idempotent."""
        gate = asyncio.Semaphore(concurrency)

        async def stop_one(w: SimWorker) -> None:
            async with gate:
                await w.stop()

        results = await asyncio.gather(*(stop_one(w) for w in self.workers), return_exceptions=True)
        self.started = False
        for w, r in zip(self.workers, results):
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                log.warning("stopping %s failed: %r", w.worker_id, r)

    def check_integrity(self) -> dict[str, str]:
        """{worker id: problem} for every worker whose invariants fail (empty: all hold). Does not mutate."""
        problems = {}
        for w in self.workers:
            try:
                w.host.check_integrity()
                w.leases.check_integrity()
            except AssertionError as e:
                problems[w.worker_id] = str(e)
        return problems

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def timing_from_args(args: argparse.Namespace) -> TimingModel:
    timing = TimingModel.load(args.timing) if args.timing else TimingModel()
    if args.max_num_batched_tokens or args.max_num_seqs:
        timing = dataclasses.replace(
            timing, max_num_batched_tokens=args.max_num_batched_tokens or timing.max_num_batched_tokens, max_num_seqs=args.max_num_seqs or timing.max_num_seqs
        )
    if args.instant:
        return TimingModel.instant(max_num_batched_tokens=timing.max_num_batched_tokens, max_num_seqs=timing.max_num_seqs)
    return timing.scaled(args.time_scale) if args.time_scale != 1.0 else timing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SimWorkerConfig(role="decode", worker_id="-", etcd="-")
    ap = argparse.ArgumentParser(prog="python -m loadtest.sim.fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint host:port")
    ap.add_argument("--cluster", default="default", help="cluster name (etcd prefix /tandem/<cluster>/)")
    ap.add_argument("--decode", type=int, default=1, help="simulated decode workers")
    ap.add_argument("--prefill", type=int, default=0, help="simulated prefill workers")
    ap.add_argument("--id-prefix", default="sim", help="worker ids are <prefix>-<role>-<i>")
    ap.add_argument("--model", default=defaults.model, help="the model name the workers register")
    ap.add_argument("--model-id", default="", help="the block-hash seed; default: --model (as real workers)")
    ap.add_argument("--block-size", type=int, default=defaults.block_size)
    ap.add_argument("--num-kv-blocks", type=int, default=defaults.num_kv_blocks, help="KV capacity per worker")
    ap.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    ap.add_argument("--max-num-seqs", type=int, default=0, help="override the timing file's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0, help="override the timing file's")
    ap.add_argument("--timing", default=None, help="TimingModel JSON/TOML (e.g. from benchmarks/calibrate_sim_timing.py); default: the built-in calibration")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply every step and pull time (0.1: ten times faster)")
    ap.add_argument("--instant", action="store_true", help="steps and pulls take no time (benchmarks of the gateway itself)")
    ap.add_argument("--lease-ttl", type=int, default=defaults.lease_ttl, help="etcd lease TTL of each worker (s)")
    ap.add_argument("--kv-lease-seconds", type=float, default=defaults.kv_lease_seconds, help="prefill: how long a handle's blocks wait for a pull")
    ap.add_argument("--json", action="store_true", help="print the ready line as JSON with every worker's address")
    ap.add_argument("--log-level", default="warning")
    return ap.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    fleet = SimFleet(
        args.etcd, args.cluster, args.decode, args.prefill, args.id_prefix, model=args.model, model_id=args.model_id,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len, timing=timing_from_args(args),
        lease_ttl=args.lease_ttl, kv_lease_seconds=args.kv_lease_seconds,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.perf_counter()
    await fleet.start()
    seconds = time.perf_counter() - t0
    if args.json:
        workers = [{"role": w.role, "worker_id": w.worker_id, "address": w.address} for w in fleet.workers]
        print(json.dumps({"ready": len(fleet), "start_seconds": round(seconds, 3), "workers": workers}), flush=True)
    else:
        print(f"ready {len(fleet)} workers", flush=True)
    log.info("%d workers registered in %.2fs", len(fleet), seconds)
    try:
        await stop.wait()
    finally:
        t0 = time.perf_counter()
        await fleet.stop()
        log.info("%d workers stopped in %.2fs", len(fleet), time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s sim.fleet[%(process)d] %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # plain asyncio works too, a little slower
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
