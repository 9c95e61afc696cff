"""The simulated engine and its timing model: arithmetic, the real scheduler's behaviour (prefix
hits, chunked prefill, preemption by recompute, cancellation), the disaggregation handoff, and KV
events that a fresh gateway PrefixIndex replays into exactly the blocks the cache holds."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import pytest

from gateway.prefix_index import PrefixIndex
from kvtransfer.block_hash import hash_blocks
from loadtest.sim.engine import SimEngine, SimImport
from loadtest.sim.host import SimHost
from loadtest.sim.kv_cache import SimKVCache
from loadtest.sim.leases import SimLeases
from loadtest.sim.timing import TimingModel

BS = 16
MODEL = "sim-test"


def make_engine(num_blocks: int = 256, timing: TimingModel | None = None, max_model_len: int = 4096) -> SimEngine:
    engine = SimEngine(SimKVCache(num_blocks, BS, MODEL), timing or TimingModel.instant(), max_model_len)
    engine.start()
    return engine


async def collect(stream) -> list:
    return [out async for out in stream]


def prompt(n: int, start: int = 1000) -> list[int]:
    return [start + i for i in range(n)]


# ---- the timing model ---------------------------------------------------------------------------


def test_timing_model_arithmetic():
    t = TimingModel(step_base_s=0.01, prefill_s_per_token=0.001, prefill_s_per_token_context=1e-6, decode_s_per_seq=0.002,
                    decode_s_per_seq_context=1e-5, kv_transfer_base_s=0.005, kv_transfer_s_per_block=0.0002)  # fmt: skip
    assert t.step_seconds(0, 0) == 0
    assert t.step_seconds(100, 0, prefill_context=5050) == pytest.approx(0.01 + 0.1 + 0.00505)
    assert t.step_seconds(0, 4, decode_context=400) == pytest.approx(0.01 + 0.008 + 0.004)
    assert TimingModel.prefill_pairs(0, 100) == 5050  # token j attends to j + 1 tokens
    assert TimingModel.prefill_pairs(10, 2) == 2 * 10 + 3
    assert t.pull_seconds(0) == 0 and t.pull_seconds(10) == pytest.approx(0.005 + 0.002)
    half = t.scaled(0.5)
    assert half.step_seconds(100, 0, prefill_context=5050) == pytest.approx(t.step_seconds(100, 0, prefill_context=5050) / 2)
    assert half.max_num_batched_tokens == t.max_num_batched_tokens
    fast = TimingModel.instant(max_num_seqs=7)
    assert fast.step_seconds(2048, 64, 10**6, 10**5) == 0 and fast.pull_seconds(100) == 0 and fast.max_num_seqs == 7
    default = TimingModel()
    assert 0.1 < default.step_seconds(128, 0, TimingModel.prefill_pairs(0, 128)) < 1, "calibrated: ~0.3 s for 128 tokens on this machine"
    with pytest.raises(ValueError, match="step_base_s"):
        TimingModel(step_base_s=-1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        TimingModel(max_num_seqs=0)


def test_timing_model_loads_json_toml_and_rejects_unknown_keys(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"timing": {"step_base_s": 0.5, "max_num_seqs": 3}, "observations": []}))
    (tmp_path / "t.toml").write_text("decode_s_per_seq = 0.25\nmax_num_batched_tokens = 512\n")
    (tmp_path / "bad.json").write_text(json.dumps({"step_base": 1}))
    assert TimingModel.load(tmp_path / "t.json") == TimingModel(step_base_s=0.5, max_num_seqs=3)
    assert TimingModel.load(tmp_path / "t.toml") == TimingModel(decode_s_per_seq=0.25, max_num_batched_tokens=512)
    with pytest.raises(ValueError, match="unknown timing setting.*step_base"):
        TimingModel.load(tmp_path / "bad.json")
    assert TimingModel.from_dict(TimingModel().to_dict()) == TimingModel()


def test_loadtest_imports_neither_torch_nor_the_engine():
    code = "import sys, loadtest.sim.fleet; sys.exit(3 if 'torch' in sys.modules or any(m.startswith('services.engine') for m in sys.modules) else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, "loadtest imports torch or services.engine" if result.returncode == 3 else result.stderr


# ---- generation ---------------------------------------------------------------------------------


async def test_generates_max_tokens_deterministically_per_request_id():
    engine = make_engine()
    try:
        outs = await collect(engine.add_request("r1", prompt(40), max_tokens=5))
        tokens = [t for o in outs for t in o.new_token_ids]
        assert len(tokens) == 5 and all(len(o.new_token_ids) == 1 for o in outs)
        last = outs[-1]
        assert last.finished and last.finish_reason == "length" and (last.num_prompt_tokens, last.num_output_tokens) == (40, 5)
        assert not any(o.finished for o in outs[:-1])
        again = await collect(engine.add_request("r1", prompt(40, 5000), max_tokens=5))
        assert [t for o in again for t in o.new_token_ids] == tokens, "the same request id gives the same tokens"
        other = await collect(engine.add_request("r2", prompt(40), max_tokens=5))
        assert [t for o in other for t in o.new_token_ids] != tokens
        assert other[-1].num_cached_tokens == 32, "the earlier prompt's two full blocks were hit"
        engine.check_integrity()
    finally:
        await engine.close()


async def test_stop_token_ids_and_the_context_length_end_a_request():
    engine = make_engine(max_model_len=50)
    try:
        tokens = [t for o in await collect(engine.add_request("s", prompt(10), max_tokens=20)) for t in o.new_token_ids]
        outs = await collect(engine.add_request("s2", prompt(10), max_tokens=20, stop_token_ids=[tokens[2]]))
        assert outs[-1].finish_reason in ("stop", "length")
        capped = await collect(engine.add_request("c", prompt(45), max_tokens=40))
        assert capped[-1].finish_reason == "length" and capped[-1].num_output_tokens == 5, "the context ends it at max_model_len"
    finally:
        await engine.close()


async def test_stop_token_id_reported():
    engine = make_engine()
    try:
        ref = [t for o in await collect(engine.add_request("same-id", prompt(10), max_tokens=6)) for t in o.new_token_ids]
        outs = await collect(engine.add_request("same-id", prompt(10, 3000), max_tokens=6, stop_token_ids=[ref[3]]))
        assert outs[-1].finish_reason == "stop" and outs[-1].stop_token_id == ref[3] and outs[-1].num_output_tokens == 4
    finally:
        await engine.close()


async def test_bad_requests_raise_value_errors_naming_the_field_and_queue_nothing():
    engine = make_engine(num_blocks=8, max_model_len=1000)
    try:
        for args, match in [
            (([], 4), "prompt must not be empty"),
            (([1, 2, 49152], 4), r"prompt_token_ids\[2\]"),
            ((prompt(1000), 4), "max_model_len"),
            ((prompt(10), 0), "max_tokens"),
            ((prompt(100), 100), "KV blocks"),  # 200 tokens need 13 blocks of 8
        ]:
            with pytest.raises(ValueError, match=match):
                engine.add_request("bad", *args)
        assert not engine.requests
        engine.add_request("dup", prompt(10), 100)
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("dup", prompt(10), 1)
    finally:
        await engine.close()


async def test_prefix_hits_reduce_the_simulated_prefill_cost():
    timing = TimingModel(step_base_s=0, prefill_s_per_token=2e-4, prefill_s_per_token_context=0, decode_s_per_seq=0, decode_s_per_seq_context=0)
    engine = make_engine(timing=timing)
    try:
        shared = prompt(30 * BS)
        t0 = time.perf_counter()
        cold = await collect(engine.add_request("cold", shared + prompt(8, 9000), max_tokens=1))
        cold_s, cold_busy = time.perf_counter() - t0, engine.busy_seconds
        t0 = time.perf_counter()
        warm = await collect(engine.add_request("warm", shared + prompt(8, 7000), max_tokens=1))
        warm_s, warm_busy = time.perf_counter() - t0, engine.busy_seconds - cold_busy
        assert cold[-1].num_cached_tokens == 0 and warm[-1].num_cached_tokens == 30 * BS
        assert cold_busy == pytest.approx((30 * BS + 8) * 2e-4) and warm_busy == pytest.approx(8 * 2e-4)
        assert warm_s < cold_s / 3, f"a warm prefill should take far less wall time ({warm_s:.3f}s vs {cold_s:.3f}s cold)"
    finally:
        await engine.close()


async def test_long_prompts_are_chunked_under_the_token_budget_and_decodes_share_steps():
    engine = make_engine(timing=TimingModel.instant(max_num_batched_tokens=64))
    seen = []
    engine.set_observer(lambda stats, events: seen.append(stats))
    try:
        decoding = engine.add_request("d", prompt(10), max_tokens=1000)
        await anext(decoding)  # running: one token per step from now on
        seen.clear()
        outs = await collect(engine.add_request("long", prompt(200, 3000), max_tokens=1))
        assert outs[-1].finished
        pending = [s.num_pending_prefill_tokens for s in seen]
        assert pending[:1] == [200] and [p for p in pending if p < 200] == [137, 74, 11, 0], "63 tokens a step beside the decode"
        assert all(s.num_running >= 1 for s in seen[1:]), "the decode kept running through the prefill"
        await decoding.aclose()
    finally:
        await engine.close()


async def test_cancellation_frees_the_requests_blocks():
    engine = make_engine(timing=TimingModel.instant())
    try:
        stream = engine.add_request("c", prompt(5 * BS + 3), max_tokens=10_000)
        await anext(stream)
        assert engine.stats().num_used_blocks == 6 and engine.stats().num_running == 1
        await stream.aclose()  # the consumer goes away
        assert engine.stats().num_used_blocks == 0 and not engine.requests
        assert engine.cache.num_cached_blocks >= 5, "its computed blocks stay in the prefix cache"
        engine.check_integrity()

        async def consume():
            async for _ in engine.add_request("t", prompt(50), max_tokens=10_000):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        task.cancel()  # as when a gRPC handler is cancelled
        await asyncio.gather(task, return_exceptions=True)
        assert engine.stats().num_used_blocks == 0 and not engine.requests
        engine.check_integrity()
    finally:
        await engine.close()


async def test_preemption_by_recompute_when_blocks_run_out():
    engine = make_engine(num_blocks=20, timing=TimingModel.instant())
    try:
        streams = [engine.add_request(f"p{i}", prompt(4 * BS, 100 * i), max_tokens=4 * BS) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 30)
        assert engine.num_preemptions > 0, "4 requests growing to 8 blocks each cannot all fit in 20 blocks"
        for outs in results:
            assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 4 * BS
        engine.check_integrity()
        assert engine.stats().num_used_blocks == 0
    finally:
        await engine.close()


async def test_an_idle_engine_does_not_step():
    engine = make_engine(timing=TimingModel.instant())
    try:
        await collect(engine.add_request("x", prompt(20), max_tokens=2))
        steps = engine.num_steps
        await asyncio.sleep(0.05)
        assert engine.num_steps == steps
    finally:
        await engine.close()


async def test_load_stats_count_pending_prefill_tokens():
    timing = TimingModel(step_base_s=0.2, prefill_s_per_token=0, prefill_s_per_token_context=0, decode_s_per_seq=0, decode_s_per_seq_context=0)
    engine = make_engine(timing=timing)
    try:
        streams = [engine.add_request(f"q{i}", prompt(100, 1000 * i), max_tokens=2) for i in range(3)]
        s = engine.stats()
        assert (s.num_waiting, s.num_running, s.num_pending_prefill_tokens) == (3, 0, 300)
        await asyncio.gather(*(collect(st) for st in streams))
        s = engine.stats()
        assert (s.num_waiting, s.num_running, s.num_pending_prefill_tokens, s.num_used_blocks) == (0, 0, 0, 0)
    finally:
        await engine.close()


# ---- disaggregation -----------------------------------------------------------------------------


async def test_prefill_pins_then_decode_imports_and_continues_the_same_sequence():
    prefill, decode, reference = make_engine(), make_engine(), make_engine()
    try:
        ids = prompt(3 * BS + 5)
        agg = [t for o in await collect(reference.add_request("pd", ids, max_tokens=6)) for t in o.new_token_ids]

        (first,) = await collect(prefill.add_request("pd", ids, max_tokens=6, prefill_only=True))
        assert first.finished and first.finish_reason is None and first.new_token_ids == agg[:1]
        pinned = first.pinned
        assert pinned.num_tokens == len(ids) and len(pinned.block_ids) == 4 and list(pinned.block_hashes) == hash_blocks(ids, BS, MODEL)
        assert prefill.stats().num_used_blocks == 4, "the prompt's blocks stay held for the decode worker"
        prefill.check_integrity()

        stream = decode.add_request("pd", ids, max_tokens=6, output_token_ids=first.new_token_ids, import_kv=True)
        target = await anext(stream)
        assert isinstance(target, SimImport) and not target.recompute and target.num_missing_blocks == 4
        assert decode.stats().num_waiting == 1
        decode.complete_kv_import("pd", ok=True)
        rest = await collect(stream)
        assert first.new_token_ids + [t for o in rest for t in o.new_token_ids] == agg, "P/D output equals the aggregated output"
        assert rest[-1].num_output_tokens == 6 and rest[-1].num_prompt_tokens == len(ids)
        assert set(hash_blocks(ids, BS, MODEL)) <= decode.cache.held_hashes(), "imported blocks join the decode worker's prefix cache"

        assert prefill.release_pinned("pd") and not prefill.release_pinned("pd")
        assert prefill.stats().num_used_blocks == 0
        for e in (prefill, decode):
            e.check_integrity()

        # a second import of the same prompt: the decode worker's own cache has the full blocks
        stream = decode.add_request("pd2", ids, max_tokens=3, output_token_ids=[5], import_kv=True)
        target = await anext(stream)
        assert target.num_cached_tokens == 3 * BS and target.num_missing_blocks == 1
        decode.complete_kv_import("pd2", ok=False)  # the pull failed: recompute here
        outs = await collect(stream)
        assert outs[-1].num_output_tokens == 3
        decode.check_integrity()
    finally:
        for e in (prefill, decode, reference):
            await e.close()


async def test_a_pinned_prefill_nobody_received_is_released():
    engine = make_engine(timing=TimingModel.instant())
    try:
        stream = engine.add_request("lost", prompt(40), max_tokens=4, prefill_only=True)
        while "lost" in engine.requests:
            await asyncio.sleep(0)
        assert "lost" in engine.pinned
        await stream.aclose()  # the Prefill RPC was cancelled before it read its reply
        assert not engine.pinned and engine.stats().num_used_blocks == 0
    finally:
        await engine.close()


async def test_leases_release_once_with_the_right_token_or_expire():
    engine = make_engine()
    leases = SimLeases(engine, lease_seconds=0.05)
    try:
        pins = []
        for rid in ("a", "b"):
            (out,) = await collect(engine.add_request(rid, prompt(40, 2000 if rid == "a" else 3000), max_tokens=4, prefill_only=True))
            pins.append(leases.grant(out.pinned))
        a, b = pins
        assert not leases.release("a", b.token), "another handle's token does not release it"
        assert leases.release("a", a.token) and not leases.release("a", a.token), "single use"
        leases.check_integrity()
        await asyncio.sleep(0.15)
        assert len(leases) == 0 and leases.num_expired == 1 and not engine.pinned
        assert engine.stats().num_used_blocks == 0
        engine.check_integrity()
    finally:
        leases.close()
        await engine.close()


# ---- KV events into the gateway's index ---------------------------------------------------------


async def test_random_workload_events_replay_into_a_fresh_prefix_index():
    """Shared prefixes, aborts, a cache small enough to evict and preempt: every batch the host
    published, applied to a fresh gateway PrefixIndex, gives exactly the cache's held blocks."""
    rng = random.Random(7)
    engine = make_engine(num_blocks=48, timing=TimingModel.instant(max_num_batched_tokens=96))
    host = SimHost("w", engine)
    subscriber, first = host.subscribe(0)
    try:
        prefixes = [prompt(rng.randrange(1, 5) * BS, 5_000 * (i + 1)) for i in range(5)]

        async def one(i: int) -> None:
            ids = rng.choice(prefixes) + [rng.randrange(300, 40_000) for _ in range(rng.randrange(1, 40))]
            stream = engine.add_request(f"r{i}", ids, max_tokens=rng.randrange(1, 40), cache_salt=rng.choice(["", "salt"]))
            if rng.random() < 0.25:
                await anext(stream)
                await stream.aclose()  # cancelled mid-way
            else:
                await collect(stream)

        for wave in range(6):
            await asyncio.wait_for(asyncio.gather(*(one(wave * 10 + i) for i in range(10))), 30)
            engine.check_integrity()
        await asyncio.sleep(0)  # the last step's events are published on the loop's next turn
        host.check_integrity()
        index = PrefixIndex()
        for event in first:
            if event.HasField("kv_events"):
                assert index.apply("w", event.kv_events)
        while not subscriber.queue.empty():
            event = subscriber.queue.get_nowait()
            if event.HasField("kv_events"):
                assert index.apply("w", event.kv_events), "batches arrive in sequence"
        assert index.held("w") == engine.cache.held_hashes() == host.kv_log.held
        assert engine.num_preemptions > 0 or engine.cache.num_cached_blocks > 0
        index.check_integrity()
        fresh = PrefixIndex()  # a consumer that connects late gets a snapshot with the same content
        (late,) = host.kv_log.since(0)
        assert late.snapshot and fresh.apply("w", late) and fresh.held("w") == engine.cache.held_hashes()
    finally:
        host.unsubscribe(subscriber)
        await engine.close()
