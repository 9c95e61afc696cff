"""KV transfer between two processes: Tandem's UCX path beside asyncio TCP, gRPC bytes and memcpy,
and the transfer's share of TTFT in a disaggregated cluster.

    python -m benchmarks.kv_transfer --out results/kv_transfer.json

Part 1, in one run: a server process holds a KV cache of the default model's layout (fp32, 30
layers × 2 × 3 KV heads × 16 tokens × 64 = 720 KiB per block) filled with random values; this
process holds another, both block-major as the engine's. For 1k, 4k and 16k tokens (64, 256, 1024
blocks, scattered ids, as in a pool that has cycled) and 4k tokens in consecutive ids on both
sides (as a fresh pool hands out a prompt's blocks), each path moves the blocks from the server's
cache into this one, end to end (request → bytes in place):
  - ucx:    KVTransportClient.pull from KVTransportServer (what decode and prefill workers run;
            on one host the client reads the blocks itself, kvtransfer/local_read.py, and after the
            first pull requests them over the server's same-host channel, local_channel.py);
  - ucx_messages: the same with local reads off (local_reads=False): one UCX message per run of
            blocks, as between hosts;
  - tcp:    the server gathers the blocks and writes them on an asyncio TCP stream (uvloop), this
            process reads with a BufferedProtocol into a buffer and scatters;
  - grpc:   the same over a gRPC server stream of 4 MiB bytes messages;
  - memcpy_2proc: the server's bytes in a shared-memory file, copied into a private (already
            touched) buffer here: memcpy between the two processes, the ceiling of any transport;
  - memcpy_gather_scatter / memcpy_contiguous: one process, the blocks copied between two caches
            with gather + scatter, and a plain copy of as many contiguous bytes.
Median of --reps runs after a warm-up; GB/s counts KV bytes. UCX is confined to loopback in both
processes, as in workers bound to their default --host 127.0.0.1. The first ucx pull is checked byte
for byte against the source.

Part 2: `tandem up`'s processes (tokenizer, one prefill and one decode worker, gateway) on free
ports; forced-disaggregated requests with 512- and 2,048-token prompts; TTFT at the client (the
prefill worker's first token) beside the decode worker's pull time (tandem_kv_pull_seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import torch
import uvloop

LAYERS, KV_HEADS, BLOCK, HEAD_DIM = 30, 3, 16, 64  # SmolLM2-135M
NUM_BLOCKS = 1100
SIZES = {"1k": (64, False), "4k": (256, False), "16k": (1024, False), "4k-runs": (256, True)}  # (blocks, consecutive ids)
GRPC_CHUNK = 4 << 20
GRPC_METHOD = "/tandem.bench.KV/Pull"


def make_cache(seed: int) -> torch.Tensor:
    """Random values in a cache allocated as the engine's KVCache is: huge pages requested before the
    first touch (UCX's process_vm_readv pins the pages it reads: 4 KiB pages halve its rate)."""
    from services.engine.malloc_tuning import advise_huge_pages

    g = torch.Generator().manual_seed(seed)
    cache = torch.empty(NUM_BLOCKS, LAYERS, 2, KV_HEADS, BLOCK, HEAD_DIM)
    advise_huge_pages(cache)
    return cache.copy_(torch.randn(cache.shape, generator=g))


def block_ids(n: int, offset: int, consecutive: bool = False) -> list[int]:
    if consecutive:
        return [(offset + i) % NUM_BLOCKS for i in range(n)]
    return [(offset + 7 * i) % NUM_BLOCKS for i in range(n)]  # scattered, as in a cycled pool


def gather(cache: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return cache[torch.tensor(ids)].contiguous()


def scatter(cache: torch.Tensor, ids: list[int], data: torch.Tensor) -> None:
    cache[torch.tensor(ids)] = data


# ---- the server process ---------------------------------------------------------------------------


def on_loopback_as_workers_are() -> None:
    """UCX confined to loopback, as a worker bound to its default --host 127.0.0.1 runs it (on every
    interface an endpoint's wire-up also weighs eth0's TCP lane: 0.32-0.41 against 0.23 ms)."""
    from kvtransfer.ucx_runtime import set_data_plane_host

    set_data_plane_host("127.0.0.1")


def server_main(conn, tcp_port: int, grpc_port: int) -> None:
    torch.set_num_threads(1)
    on_loopback_as_workers_are()
    uvloop.run(serve(conn, tcp_port, grpc_port))


async def serve(conn, tcp_port: int, grpc_port: int) -> None:
    from kvtransfer.ucx_transport import KVTransportServer

    cache = make_cache(1)
    ucx = KVTransportServer(cache)
    await ucx.start()

    async def on_tcp(reader, writer):
        while header := await reader.readline():
            ids = [int(x) for x in header.split()]
            writer.write(memoryview(gather(cache, ids).numpy()).cast("B"))
            await writer.drain()

    tcp = await asyncio.start_server(on_tcp, "127.0.0.1", tcp_port)

    async def pull(request: bytes, context):
        ids = [int(x) for x in request.split()]
        data = memoryview(gather(cache, ids).numpy()).cast("B")
        for i in range(0, len(data), GRPC_CHUNK):
            yield bytes(data[i : i + GRPC_CHUNK])

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 2 * GRPC_CHUNK)])
    handler = grpc.unary_stream_rpc_method_handler(pull, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tandem.bench.KV", {"Pull": handler})])
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    conn.send(ucx.address)
    loop = asyncio.get_running_loop()
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] == "expose":
            ucx.expose(msg[1], msg[2], time.time() + 60, peer_address=msg[3])
            conn.send("ok")
        elif msg[0] == "shm":  # the blocks, gathered into a shared-memory file the client maps
            path, ids = msg[1], msg[2]
            data = gather(cache, ids).view(-1)
            shm = torch.from_file(path, shared=True, size=data.numel(), dtype=torch.float32)
            shm.copy_(data)
            conn.send("ok")
        else:
            break
    await ucx.close()
    tcp.close()
    await server.stop(0)


# ---- the client side ------------------------------------------------------------------------------


class Receiver(asyncio.BufferedProtocol):
    def __init__(self):
        self.buf, self.got, self.done = bytearray(0), 0, None
        # uvloop asks for a buffer whenever it may read, also between transfers: a spare one then,
        # which stays empty because the server sends only what was asked
        self.spare = bytearray(1 << 16)

    def expect(self, nbytes: int) -> asyncio.Future:
        if len(self.buf) != nbytes:  # reused across repetitions, so page faults are not measured
            self.buf = bytearray(nbytes)
        self.got = 0
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def get_buffer(self, sizehint):
        return memoryview(self.buf)[self.got :] if self.got < len(self.buf) else memoryview(self.spare)

    def buffer_updated(self, nbytes):
        self.got += nbytes
        if self.got == len(self.buf):
            self.done.set_result(None)


async def bench_paths(args, conn, address: bytes, tcp_port: int, grpc_port: int) -> dict:
    from kvtransfer.ucx_transport import KVTransportClient

    cache = make_cache(2)
    src_check = make_cache(1)  # the server's cache, rebuilt from the same seed, to check bytes
    client = KVTransportClient(cache)
    await client.start()
    messages_client = KVTransportClient(cache, local_reads=False)  # the same UCX worker, so the same address
    await messages_client.start()
    transport, receiver = await asyncio.get_running_loop().create_connection(Receiver, "127.0.0.1", tcp_port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", 2 * GRPC_CHUNK)])
    grpc_pull = channel.unary_stream(GRPC_METHOD, request_serializer=None, response_deserializer=None)
    loop = asyncio.get_running_loop()
    results = {}
    token_no = 0
    for label, (n, consecutive) in SIZES.items():
        src, dst = block_ids(n, 3, consecutive), block_ids(n, 500, consecutive)
        nbytes = n * LAYERS * 2 * KV_HEADS * BLOCK * HEAD_DIM * 4
        paths = ("ucx", "ucx_messages", "tcp", "grpc", "memcpy_2proc", "memcpy_gather_scatter", "memcpy_contiguous")
        times: dict[str, list[float]] = {path: [] for path in paths}
        # memcpy between two processes: the server's bytes in shared memory, copied into a private,
        # already-touched buffer here (the ceiling of any transport between the two processes)
        shm_path = f"/dev/shm/tandem-kvbench-{os.getpid()}-{n}"
        await loop.run_in_executor(None, lambda: (conn.send(("shm", shm_path, src)), conn.recv()))
        shared = torch.from_file(shm_path, shared=True, size=nbytes // 4, dtype=torch.float32)
        private, flat_src, flat_dst = torch.ones(nbytes // 4), torch.ones(nbytes // 4), torch.ones(nbytes // 4)
        for rep in range(args.reps + 1):
            for path, puller in (("ucx", client), ("ucx_messages", messages_client)):
                token_no += 1
                token = token_no.to_bytes(16, "little")
                await loop.run_in_executor(None, lambda: (conn.send(("expose", token, src, client.address)), conn.recv()))
                cache[torch.tensor(dst)] = 0.0  # the first pull is checked: nothing left from the path before
                t = time.perf_counter()
                await puller.pull(address, token, src, dst, timeout=60)
                times[path].append(time.perf_counter() - t)
                if rep == 0:
                    assert torch.equal(cache[torch.tensor(dst)], src_check[torch.tensor(src)]), f"the {path} pull corrupted the blocks"

            t = time.perf_counter()
            done = receiver.expect(nbytes)
            transport.write(" ".join(map(str, src)).encode() + b"\n")
            await done
            scatter(cache, dst, torch.frombuffer(receiver.buf, dtype=torch.float32).view(n, LAYERS, 2, KV_HEADS, BLOCK, HEAD_DIM))
            times["tcp"].append(time.perf_counter() - t)

            t = time.perf_counter()
            parts = [chunk async for chunk in grpc_pull(" ".join(map(str, src)).encode(), timeout=120)]
            scatter(cache, dst, torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.float32).view(n, LAYERS, 2, KV_HEADS, BLOCK, HEAD_DIM))
            times["grpc"].append(time.perf_counter() - t)

            t = time.perf_counter()
            private.copy_(shared)
            times["memcpy_2proc"].append(time.perf_counter() - t)

            t = time.perf_counter()
            scatter(cache, dst, gather(src_check, src))
            times["memcpy_gather_scatter"].append(time.perf_counter() - t)
            t = time.perf_counter()
            flat_dst.copy_(flat_src)
            times["memcpy_contiguous"].append(time.perf_counter() - t)
        del shared
        os.unlink(shm_path)
        results[label] = {
            "blocks": n, "bytes": nbytes,
            **{path: {"seconds": statistics.median(ts[1:]), "GBps": nbytes / statistics.median(ts[1:]) / 1e9} for path, ts in times.items()},
        }  # fmt: skip
    transport.close()
    await channel.close()
    await client.close()
    await messages_client.close()
    return results


# ---- part 2: TTFT in a cluster ----------------------------------------------------------------------


def pull_seconds(metrics_port: int) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values.get("tandem_kv_pull_seconds_sum", 0.0), values.get("tandem_kv_pull_seconds_count", 0.0)


async def ttft_share(args) -> dict:
    from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
    from tandem.launcher import ClusterSpec, LocalCluster

    spec = ClusterSpec(free_ports=True, workdir=Path(tempfile.mkdtemp(prefix="tandem-kvbench-")),
                       role_args={"prefill": ["--threads", "2"], "decode": ["--threads", "1"]},
                       worker_args=["--kv-cache-gb", "0.5"])  # fmt: skip
    cluster = LocalCluster(spec)
    out = {}
    try:
        await asyncio.to_thread(cluster.start)
        decode_metrics = cluster.service("decode-0").metrics_port
        async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for n in (512, 2048):
                ttfts, second, pulls = [], [], []
                for rep in range(args.reps + 1):
                    ids = [(1000 + rep * 131 + i * 17) % 40000 for i in range(n)]  # no prefix hits between reps
                    request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), mode=gateway_pb2.SERVING_MODE_DISAGGREGATED,
                                                          sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # fmt: skip
                    s0, c0 = pull_seconds(decode_metrics)
                    t, arrivals = time.perf_counter(), []
                    async for chunk in stub.Generate(request, timeout=300):
                        arrivals += [time.perf_counter() - t] * len(chunk.token_ids)
                    s1, c1 = pull_seconds(decode_metrics)
                    assert c1 == c0 + 1, "each request must pull once"
                    if rep:
                        ttfts.append(arrivals[0])
                        second.append(arrivals[1] - arrivals[0])
                        pulls.append(s1 - s0)
                ttft, pull = statistics.median(ttfts), statistics.median(pulls)
                out[str(n)] = {"ttft_s": ttft, "second_token_gap_s": statistics.median(second), "pull_s": pull, "pull_share_of_ttft": pull / ttft}
    finally:
        await asyncio.to_thread(cluster.stop)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-cluster", action="store_true", help="only part 1")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from tandem.launcher import free_ports

    tcp_port, grpc_port = free_ports(2)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_main, args=(child, tcp_port, grpc_port), daemon=True)
    proc.start()
    cpu0 = time.process_time()
    on_loopback_as_workers_are()
    try:
        address = parent.recv()
        paths = uvloop.run(bench_paths(args, parent, address, tcp_port, grpc_port))
    finally:
        parent.send(("stop",))
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    cpu_client = time.process_time() - cpu0
    print(f"KV transfer between two processes, median of {args.reps} (GB/s of KV bytes; seconds):")
    names = ("ucx", "ucx_messages", "tcp", "grpc", "memcpy_2proc", "memcpy_gather_scatter", "memcpy_contiguous")
    print(f"{'size':6} {'blocks':>6} {'MB':>7} " + " ".join(f"{p:>22}" for p in names))
    for label, r in paths.items():
        cells = " ".join(f"{r[p]['GBps']:9.2f} ({r[p]['seconds'] * 1e3:8.1f} ms)" for p in names)
        print(f"{label:6} {r['blocks']:6d} {r['bytes'] / 1e6:7.1f} {cells}")
    record = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "paths": paths, "client_cpu_s": cpu_client}
    if not args.skip_cluster:
        share = uvloop.run(ttft_share(args))
        record["ttft"] = share
        print("\nDisaggregated requests (median): prompt tokens, TTFT, decode's pull, pull / TTFT, gap to the second token")
        for n, r in share.items():
            print(
                f"{n:>6} {r['ttft_s'] * 1e3:8.1f} ms {r['pull_s'] * 1e3:8.1f} ms {100 * r['pull_share_of_ttft']:6.1f} % {r['second_token_gap_s'] * 1e3:8.1f} ms"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
