"""KV pull latency on one host: same-host local reads against UCX messages, alternating.

    python -m benchmarks.kv_pull_latency --blocks 1 64 256 --reps 20

A server process holds the default model's cache (benchmarks.kv_transfer's layout, 720 KiB
blocks); this process pulls the same scattered blocks with two clients in turn, pull by pull: the
default one (on the server's host it reads the blocks itself, kvtransfer/local_read.py, its requests
after the first going over the server's same-host channel, local_channel.py) and one
with local_reads=False (one UCX message per run of blocks, the path between hosts). Alternating in
one pair of processes keeps the VM's minute-to-minute drift out of the comparison. UCX is confined
to loopback in both processes, as in workers bound to their default --host. Prints p50 and
min per size and path (the first pull of each is a warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from benchmarks.kv_transfer import block_ids, make_cache, on_loopback_as_workers_are


def server_main(conn) -> None:
    import uvloop

    from kvtransfer.ucx_transport import KVTransportServer

    on_loopback_as_workers_are()

    async def main():
        server = KVTransportServer(make_cache(1))
        await server.start()
        conn.send(server.address)
        loop = asyncio.get_running_loop()
        while (msg := await loop.run_in_executor(None, conn.recv)) is not None:
            token, ids, peer = msg
            server.expose(token, ids, time.time() + 60, peer_address=peer)
            conn.send("ok")
        await server.close()

    uvloop.run(main())


async def bench(conn, address: bytes, sizes: list[int], reps: int) -> dict:
    from kvtransfer.ucx_transport import KVTransportClient

    cache = make_cache(2)
    clients = {"local": KVTransportClient(cache), "messages": KVTransportClient(cache, local_reads=False)}
    for c in clients.values():
        await c.start()
    loop = asyncio.get_running_loop()
    times: dict[tuple[int, str], list[float]] = {(n, path): [] for n in sizes for path in clients}
    token_no = 0
    for rep in range(reps + 1):
        for n in sizes:
            src, dst = block_ids(n, 3), block_ids(n, 500)
            for path, client in clients.items():
                token_no += 1
                token = token_no.to_bytes(16, "little")
                await loop.run_in_executor(None, lambda: (conn.send((token, src, client.address)), conn.recv()))
                t = time.perf_counter()
                await client.pull(address, token, src, dst, timeout=60)
                if rep:
                    times[(n, path)].append(time.perf_counter() - t)
    for c in clients.values():
        await c.close()
    return {f"{n}/{path}": {"blocks": n, "path": path, "p50_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3} for (n, path), ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_main, args=(child,), daemon=True)
    proc.start()
    on_loopback_as_workers_are()
    try:
        address = parent.recv()
        results = asyncio.run(bench(parent, address, args.blocks, args.reps))
    finally:
        parent.send(None)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    print(f"KV pulls on one host, {args.reps} of each alternating (ms):")
    for r in results.values():
        print(f"{r['blocks']:6d} blocks  {r['path']:8s}  p50 {r['p50_ms']:7.2f}  min {r['min_ms']:7.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
