"""An engine thread that dies fails every stream and check at once and tells on_death() callbacks;
the fault-injection hook only arms from its environment variable."""

from __future__ import annotations

import asyncio

import pytest

from services.engine import AsyncEngine, EngineConfig, SamplingParams
from services.engine.async_engine import EngineDeadError
from services.engine.fault_injection import ENV_AFTER_STEPS, EngineFault, InjectedEngineFault

LONG = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)


@pytest.mark.parametrize(
    "environ, after",
    [({}, None), ({ENV_AFTER_STEPS: ""}, None), ({ENV_AFTER_STEPS: "0"}, 0), ({ENV_AFTER_STEPS: " 7 "}, 7)],
)
def test_fault_reads_its_variable(environ, after):
    assert EngineFault.from_environ(environ).after_steps == after


@pytest.mark.parametrize("raw", ["x", "1.5", "-1"])
def test_fault_rejects_a_bad_value_naming_the_variable(raw):
    with pytest.raises(ValueError, match=ENV_AFTER_STEPS):
        EngineFault.from_environ({ENV_AFTER_STEPS: raw})


def test_fault_raises_before_the_step_after_the_count():
    fault = EngineFault(2)
    fault.before_step()
    fault.before_step()
    with pytest.raises(InjectedEngineFault):
        fault.before_step()
    EngineFault(None).before_step()  # unarmed: never


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the fault, as intended
async def test_engine_death_fails_streams_checks_and_new_requests(tiny_llama, monkeypatch):
    monkeypatch.setenv(ENV_AFTER_STEPS, "5")
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama), block_size=16, num_kv_blocks=128))
    try:
        deaths: list[BaseException] = []
        engine.on_death(deaths.append)
        stream = await engine.add_request("a", list(range(3, 40)), LONG)
        got = []
        with pytest.raises(EngineDeadError):
            async for out in stream:
                got.append(out)
        assert 1 <= len(got) <= 5  # the tokens of the steps before the fault
        await asyncio.sleep(0.05)  # the callback runs on this loop
        assert len(deaths) == 1 and isinstance(deaths[0], InjectedEngineFault)
        with pytest.raises(EngineDeadError):
            await engine.add_request("b", list(range(3, 10)), LONG)
        with pytest.raises(EngineDeadError):  # does not hang waiting for a thread that is gone
            await asyncio.wait_for(engine.check_integrity_live(), 5)
        late: list[BaseException] = []
        engine.on_death(late.append)  # registered after the death: still told
        await asyncio.sleep(0)
        assert late == deaths
    finally:
        await engine.shutdown()


class _AbortingContext:
    """The slice of grpc.aio.ServicerContext the guard uses: abort() raises, as grpc's does."""

    def __init__(self):
        self.aborted = None

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise AssertionError("aborted")  # grpc raises AbortError here; any exception ends the handler


async def test_a_worker_answers_unavailable_until_it_is_ready():
    """A worker restarted on its predecessor's address gets calls before its engine is loaded: they
    must get UNAVAILABLE (retry elsewhere), not reach a handler with no engine (INTERNAL)."""
    import grpc

    from services.worker.engine_failure import EngineFailure, EngineFailureGuard

    failure = EngineFailure("decode-0")
    guard = EngineFailureGuard(failure)
    reached = []

    async def behavior(request, context):
        reached.append(request)
        return "ok"

    guarded = guard._guard_unary(behavior)
    ctx = _AbortingContext()
    with pytest.raises(AssertionError, match="aborted"):
        await guarded("early", ctx)
    assert ctx.aborted[0] == grpc.StatusCode.UNAVAILABLE and "still starting" in ctx.aborted[1] and reached == []
    failure.ready = True
    assert await guarded("later", _AbortingContext()) == "ok" and reached == ["later"]
