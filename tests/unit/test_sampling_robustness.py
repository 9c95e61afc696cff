"""Extreme sampling values never reach torch.multinomial's exceptions: a tiny temperature is greedy,
a row without a valid distribution fails its request alone (finish_reason "error"), and the engine
thread and the other requests of the batch go on unchanged."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine import AsyncEngine, EngineConfig, SamplingParams
from services.engine.request import Request
from services.engine.sampler import SamplingFailure, sample


def _req(rid: str, **params) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**params), 0.0)


def test_a_tiny_temperature_is_greedy_and_huge_logits_are_sampled():
    logits = torch.tensor([[1.0, 5.0, 2.0], [3e30, -3e30, 1e30], [0.0, 0.0, 1e4]])
    reqs = [_req("a", temperature=1e-30), _req("b", temperature=1e-5, seed=1), _req("c", temperature=100.0, top_p=1e-30, seed=2)]
    tokens, _ = sample(logits, reqs)
    assert tokens[0] == 1  # greedy: dividing by 1e-30 would overflow to inf and NaN
    assert tokens[1] == 0
    assert tokens[2] == 2  # top_p tiny keeps the top token only


@pytest.mark.parametrize("row", [[float("nan")] * 4, [float("inf"), 1.0, float("inf"), 0.0], [float("-inf")] * 4])
def test_a_row_without_a_distribution_fails_alone(row):
    logits = torch.tensor([row, [0.0, 9.0, 1.0, 2.0], [0.0, 1.0, 2.0, 9.0]])
    reqs = [_req("bad", temperature=0.7, logprobs=2), _req("greedy", temperature=0, logprobs=2), _req("seeded", temperature=0.5, seed=3)]
    tokens, logprobs = sample(logits, reqs)
    assert isinstance(tokens[0], SamplingFailure) and "temperature" in tokens[0].message
    assert logprobs[0] is None
    assert tokens[1] == 1 and logprobs[1].token_id == 1
    assert isinstance(tokens[2], int)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 1.0}, "max_tokens"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["x" * 1025]}, r"stop\[0\]"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"stop_token_ids": [1, -2]}, r"stop_token_ids\[1\]"),
    ],
)
def test_engine_side_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


@pytest.fixture
async def engine(tiny_llama):
    eng = AsyncEngine(EngineConfig(model=str(tiny_llama), block_size=16, num_kv_blocks=128))
    yield eng
    await eng.shutdown()


async def _run(engine, requests: dict[str, SamplingParams]) -> dict[str, list]:
    async def collect(stream):
        return [out async for out in stream]

    streams = {rid: await engine.add_request(rid, list(range(3, 30)), params) for rid, params in requests.items()}
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams.values())), timeout=60)
    return dict(zip(streams, results))


async def test_the_engine_survives_a_failing_row_and_the_batch_is_unchanged(engine):
    neighbours = {
        "greedy": SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        "seeded": SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7, ignore_eos=True, logprobs=3),
    }
    alone = await _run(engine, {f"{rid}-alone": p for rid, p in neighbours.items()})
    poisoned = SamplingParams(max_tokens=12, ignore_eos=True)
    poisoned.temperature = float("nan")  # what validation would refuse: a row with no distribution
    together = await _run(engine, {**neighbours, "poisoned": poisoned})

    failed = together["poisoned"][-1]
    assert failed.finished and failed.finish_reason == "error" and "not finite" in failed.error
    assert failed.new_token_ids == [] and failed.token_ids == []
    for rid in neighbours:
        assert together[rid][-1].token_ids == alone[f"{rid}-alone"][-1].token_ids
        assert together[rid][-1].finish_reason == "length" and together[rid][-1].error is None
    assert engine.error is None, "the engine thread is alive"
    after = await _run(engine, {"after": SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)})
    assert len(after["after"][-1].token_ids) == 3
    await engine.check_integrity_live()
    assert engine.core.kv.pool.num_used_blocks == 0


def test_a_failed_output_is_invalid_argument_at_the_worker():
    import grpc

    from services.common.errors import RequestError
    from services.engine.engine_core import RequestOutput
    from services.worker.translate import response_from_output

    out = RequestOutput("r1", [1, 2], [], [], "", "", True, "error", error="the sampling distribution is not finite")
    with pytest.raises(RequestError) as err:
        response_from_output(out, 0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in str(err.value)


async def test_worker_side_size_checks_come_before_any_pass_over_the_prompt(engine):
    params = SamplingParams(max_tokens=1)
    with pytest.raises(ValueError, match=r"^prompt is 2000000 tokens"):
        await engine.add_request("long", [10**9] * 2_000_000, params)  # refused by its length, not id by id
    with pytest.raises(ValueError, match=r"^cache_salt must be at most 1024 characters, got 2000"):
        await engine.add_request("salty", [3, 4, 5], params, cache_salt="s" * 2000)
    assert not engine.core.requests


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_greedy_takes_the_first_maximum_in_the_model_dtype(dtype):
    """Logits arrive in the model's dtype; ties (common in bf16) go to the lowest token id, as argmax does."""
    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -2.0, -0.5, -0.5]]).to(dtype)
    reqs = [_req(str(i), temperature=0) for i in range(3)]
    tokens, _ = sample(logits, reqs)
    assert tokens == [1, 0, 2] == logits.float().argmax(dim=-1).tolist()
    mixed, _ = sample(logits, [reqs[0], _req("s", temperature=0.8, seed=1), reqs[2]])
    assert mixed[0] == 1 and mixed[2] == 2 and isinstance(mixed[1], int)
