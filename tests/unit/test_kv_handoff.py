"""Disaggregation inside the engine: a prefill engine pins a prompt's KV, a decode engine imports
the blocks it lacks (copied here in process; kvtransfer moves them between processes) and the
output equals one engine doing it all, token for token."""

from __future__ import annotations

import random

import pytest

from services.engine import SamplingParams
from services.engine.engine_config import EngineConfig
from services.engine.engine_core import EngineCore
from services.engine.kv_handoff import Handoff

BLOCK = 16
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def engine(model_dir, **kw) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model_dir), block_size=BLOCK, num_kv_blocks=64, model_id="tiny", **kw))


def run(core: EngineCore) -> dict:
    outs = {}
    while core.has_work():
        for out in core.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def prefill(core: EngineCore, rid: str, ids: list[int], params=GREEDY):
    core.add_request(rid, ids, params, handoff=Handoff.prefill())
    out = run(core)[rid]
    assert out.finished and out.finish_reason is None and out.pinned_kv is not None
    return out


def copy_blocks(src: EngineCore, dst: EngineCore, src_ids, dst_ids) -> None:
    dst.runner.kv_cache.scatter_blocks(list(dst_ids), src.runner.kv_cache.gather_blocks(list(src_ids)))


def disaggregated(p: EngineCore, d: EngineCore, rid: str, ids: list[int], params=GREEDY):
    first = prefill(p, rid, ids, params)
    pinned = first.pinned_kv
    d.add_request(rid, ids, params, handoff=Handoff(output_token_ids=tuple(first.token_ids), import_kv=True))
    target = d.kv_import(rid)
    assert target is not None and len(target.block_ids) == len(pinned.block_ids)
    missing = target.missing_block_ids
    copy_blocks(p, d, pinned.block_ids[target.first_missing_block :], missing)
    d.complete_kv_import(rid, ok=True)
    assert p.release_pinned(rid)
    return first, target, run(d)[rid]


@pytest.mark.parametrize("n", [5, BLOCK, BLOCK + 1, 5 * BLOCK + 3])
def test_disaggregated_equals_aggregated(tiny_llama, n):
    ids = prompt(n, seed=n)
    expected = run_one(engine(tiny_llama), ids)
    p, d = engine(tiny_llama), engine(tiny_llama)
    first, target, out = disaggregated(p, d, "r", ids)
    assert first.token_ids == expected.token_ids[:1]
    assert out.token_ids == expected.token_ids
    assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    assert target.num_cached_tokens == 0 and len(target.missing_block_ids) == -(-n // BLOCK)
    p.check_integrity()
    d.check_integrity()
    assert p.kv.pool.num_used_blocks == 0 and d.kv.pool.num_used_blocks == 0


def run_one(core: EngineCore, ids, params=GREEDY):
    core.add_request("ref", ids, params)
    return run(core)["ref"]


def test_decode_reuses_its_cached_prefix_and_imports_only_the_rest(tiny_llama):
    shared = prompt(3 * BLOCK, seed=1)
    ids = shared + prompt(2 * BLOCK + 5, seed=2)
    expected = run_one(engine(tiny_llama), ids)
    p, d = engine(tiny_llama), engine(tiny_llama)
    run_one(d, shared + [7, 7, 7])  # the decode engine now holds the three shared blocks
    _, target, out = disaggregated(p, d, "r", ids)
    assert target.num_cached_tokens == 3 * BLOCK
    assert len(target.missing_block_ids) == 3  # two full blocks and the partial last one
    assert out.token_ids == expected.token_ids
    assert out.num_cached_tokens == 3 * BLOCK


def test_failed_import_recomputes_with_the_same_output(tiny_llama):
    ids = prompt(40, seed=5)
    expected = run_one(engine(tiny_llama), ids)
    p, d = engine(tiny_llama), engine(tiny_llama)
    first = prefill(p, "r", ids)
    d.add_request("r", ids, GREEDY, handoff=Handoff(output_token_ids=tuple(first.token_ids), import_kv=True))
    d.complete_kv_import("r", ok=False)  # e.g. the prefill worker died mid-transfer
    out = run(d)["r"]
    assert out.token_ids == expected.token_ids
    d.check_integrity()
    assert d.kv.pool.num_used_blocks == 0
    # the prefill side still holds the blocks until released (or its lease runs out)
    assert p.kv.pool.num_used_blocks == 3
    p.check_integrity()
    assert p.release_pinned("r") and not p.release_pinned("r")
    assert p.kv.pool.num_used_blocks == 0


def test_abort_while_importing_frees_the_blocks(tiny_llama):
    p, d = engine(tiny_llama), engine(tiny_llama)
    ids = prompt(50, seed=6)
    first = prefill(p, "r", ids)
    d.add_request("r", ids, GREEDY, handoff=Handoff(output_token_ids=tuple(first.token_ids), import_kv=True))
    assert d.kv.pool.num_used_blocks == 4
    assert not d.has_work(), "an import waits outside the scheduler"
    assert d.abort("r")
    outs = run(d)
    assert outs["r"].finish_reason == "abort"
    d.complete_kv_import("r", ok=True)  # a transfer finishing after the abort changes nothing
    d.check_integrity()
    assert d.kv.pool.num_used_blocks == 0 and not d.importing


def test_first_token_ending_the_request_pins_nothing(tiny_llama):
    p = engine(tiny_llama)
    p.add_request("r", prompt(20), SamplingParams(max_tokens=1, temperature=0), handoff=Handoff.prefill())
    out = run(p)["r"]
    assert out.finish_reason == "length" and out.pinned_kv is None
    p.check_integrity()
    assert p.kv.pool.num_used_blocks == 0


def test_pinned_blocks_stay_in_the_prefix_cache_after_release(tiny_llama):
    p = engine(tiny_llama)
    ids = prompt(2 * BLOCK + 3, seed=9)
    first = prefill(p, "r", ids)
    assert len(first.pinned_kv.block_hashes) == 2 and first.pinned_kv.num_tokens == len(ids)
    p.release_pinned("r")
    p.add_request("again", ids, GREEDY, handoff=Handoff.prefill())
    again = run(p)["again"]
    assert again.num_cached_tokens == 2 * BLOCK
    assert again.token_ids == first.token_ids


def test_streamed_text_continues_where_the_prefill_left_off(default_model_dir):
    # a stop string makes both engines hold text back; the client sees prefill's delta for the
    # first token, then decode's deltas: together exactly the single-engine text
    params = SamplingParams(max_tokens=24, temperature=0, stop=["answer"])
    cfg = dict(model="default", num_kv_blocks=64, num_threads=1)
    single, p, d = EngineCore(EngineConfig(**cfg)), EngineCore(EngineConfig(**cfg)), EngineCore(EngineConfig(**cfg))
    ids = single.tokenizer.encode("The capital of France is")
    single.add_request("r", ids, params)
    expected_deltas = stream(single)
    first = prefill(p, "r", ids, params)
    d.add_request("r", ids, params, handoff=Handoff(output_token_ids=tuple(first.token_ids), import_kv=True))
    target = d.kv_import("r")
    copy_blocks(p, d, first.pinned_kv.block_ids, target.missing_block_ids)
    d.complete_kv_import("r", ok=True)
    deltas = [first.delta_text] + stream(d)
    assert "".join(deltas) == "".join(expected_deltas)
    assert "answer" not in "".join(deltas) and "".join(deltas).startswith(" Paris")


def stream(core: EngineCore) -> list[str]:
    deltas = []
    while core.has_work():
        deltas += [out.delta_text for out in core.step()]
    return deltas
