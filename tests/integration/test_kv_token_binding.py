"""The KV transfer token is bound to the decode worker it was issued for (issue 14, item 5), between
real processes: one prefill worker, two decode workers, a gateway.

A stolen token presented from another UCX peer (this test process) gets no answer at all, so the
prefill worker dialed nothing, and it burns nothing: the bound decode worker's pull of the same
grant still succeeds. A handle given to a decode worker it was not bound to (the gateway moved the
request after prefill) is recomputed there at once, and its KV released. A PrefillRequest that names
no decode worker is refused; a decode worker that advertises no data-plane identity (a version
before the binding) is never handed KV.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from kvtransfer.ucx_transport import KVTransferError, KVTransportClient
from loadtest.sim.fleet import SimFleet
from protos.tandem.v1 import common_pb2, gateway_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.sim_cluster import FAST, InProcessGateway
from tests.helpers.waiting import eventually
from tests.integration.conftest import running_cluster
from tests.integration.test_disaggregation import (
    AGG,
    DISAGG,
    ROLE_ARGS,
    decode_directly,
    generate,
    ids,
    load,
    metric,
    prefill_directly,
    registration,  # fmt: skip
    tokens,
    wait_idle,
)

pytestmark = pytest.mark.slow


# Grants here outlive the thief's 2 s wait with room to spare: with test_disaggregation's 3 s lease a
# slow machine saw the bound worker's pull arrive after the grant's expiry (and recompute instead).
# No test in this module is about expiry; the 5 s release check below is then stricter, not looser.
LONG_LEASE_ARGS = {**ROLE_ARGS, "prefill": ["--kv-lease-seconds", "30"]}


@pytest.fixture(scope="module")
def pdd(tmp_path_factory, default_model_dir):
    with running_cluster(tmp_path_factory.mktemp("pdd"), role_args=LONG_LEASE_ARGS, num_prefill=1, num_decode=2) as c:
        yield c


def thief_pull(c, reply: worker_pb2.PrefillResponse, timeout: float) -> str:
    """Present the handle's token from this process's own UCX worker, as a peer that learned it
    would; returns why the pull failed."""
    layout = registration(c, "prefill-0").kv_layout
    cache = torch.zeros((len(reply.kv_handle.block_ids), layout.num_layers, 2, layout.num_kv_heads, layout.block_size, layout.head_dim),
                        dtype=getattr(torch, layout.dtype))  # fmt: skip

    async def pull() -> str:
        client = KVTransportClient(cache)
        await client.start()
        try:
            n = len(reply.kv_handle.block_ids)
            await client.pull(reply.kv_handle.ucx_address, reply.kv_handle.transfer_token, list(reply.kv_handle.block_ids), list(range(n)), timeout=timeout)
        except KVTransferError as e:
            return str(e)
        finally:
            await client.close()
        return "pulled"

    return asyncio.run(pull())


def test_a_stolen_token_gets_no_answer_and_the_bound_decode_worker_still_pulls(pdd):
    prompt = ids(16 * 3 + 5, start=61)  # cold everywhere: decode-0 must pull all of its blocks
    reply = prefill_directly(pdd, prompt, "stolen", for_decode="decode-0")
    assert reply.kv_handle.decode_worker_id == "decode-0" and reply.kv_handle.decode_kv_address == registration(pdd, "decode-0").kv_client_address
    dropped = metric(pdd, "prefill-0", "tandem_kv_pull_requests_dropped_total")

    outcome = thief_pull(pdd, reply, timeout=2.0)
    # not even a refusal came back: answering needs an endpoint to the presented address
    assert "timed out" in outcome and "waiting for the server's answer" in outcome, outcome
    assert metric(pdd, "prefill-0", "tandem_kv_pull_requests_dropped_total") == dropped + 1
    assert load(pdd, "prefill-0").num_used_blocks == len(reply.kv_handle.block_ids), "a refused pull must not end the lease"

    pulled, failures = metric(pdd, "decode-0", "tandem_kv_pull_blocks_total"), metric(pdd, "decode-0", "tandem_kv_pull_failures_total")
    chunks = decode_directly(pdd, prompt, reply, "stolen", name="decode-0")
    assert metric(pdd, "decode-0", "tandem_kv_pull_blocks_total") - pulled == len(reply.kv_handle.block_ids), "the bound worker pulled the KV"
    assert metric(pdd, "decode-0", "tandem_kv_pull_failures_total") == failures
    assert [reply.first.token_ids[0]] + tokens(chunks) == tokens(generate(pdd, prompt, AGG, max_tokens=8))
    wait_idle(pdd, "prefill-0", "decode-0")


def test_a_handle_bound_to_another_decode_worker_is_recomputed_without_a_pull(pdd):
    prompt = ids(16 * 2 + 3, start=71)
    expected = tokens(generate(pdd, prompt, AGG, max_tokens=8))
    reply = prefill_directly(pdd, prompt, "moved", for_decode="decode-0")
    dropped = metric(pdd, "prefill-0", "tandem_kv_pull_requests_dropped_total")
    pulled, failures = metric(pdd, "decode-1", "tandem_kv_pull_blocks_total"), metric(pdd, "decode-1", "tandem_kv_pull_failures_total")
    chunks = decode_directly(pdd, prompt, reply, "moved", name="decode-1")  # the request moved after prefill
    assert [reply.first.token_ids[0]] + tokens(chunks) == expected
    assert metric(pdd, "decode-1", "tandem_kv_pull_failures_total") == failures + 1  # the recompute fallback
    assert metric(pdd, "decode-1", "tandem_kv_pull_blocks_total") == pulled
    assert metric(pdd, "prefill-0", "tandem_kv_pull_requests_dropped_total") == dropped, "decode-1 must not even try the pull"
    with grpc.insecure_channel(pdd.service("prefill-0").address) as ch:  # as the gateway does when the request ends
        released = worker_pb2_grpc.PrefillStub(ch).ReleaseKV(
            worker_pb2.ReleaseKVRequest(request_id=reply.kv_handle.request_id, transfer_token=reply.kv_handle.transfer_token), timeout=10
        )
    assert released.released
    wait_idle(pdd, "prefill-0", "decode-1", timeout=5)  # freed now, not at the lease's expiry


def test_a_prefill_request_without_a_decode_worker_is_refused(pdd):
    with grpc.insecure_channel(pdd.service("prefill-0").address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.PrefillStub(ch).Prefill(
                worker_pb2.PrefillRequest(request_id="unbound", prompt_token_ids=ids(40), sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=30
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode_kv_address is required" in err.value.details()
    wait_idle(pdd, "prefill-0")  # nothing was computed or pinned


def test_the_gateway_binds_each_prefill_to_the_decode_worker_it_chose(pdd):
    def totals():
        return [metric(pdd, name, sample) for name in ("decode-0", "decode-1")
                for sample in ("tandem_kv_pull_blocks_total", "tandem_kv_pull_failures_total")] + [metric(pdd, "prefill-0", "tandem_kv_pull_requests_dropped_total")]  # fmt: skip

    before = totals()
    prompts = [ids(16 * 4 + 7, start=81), ids(16 * 2, start=82), ids(16 * 3 + 1, start=83)]
    disagg = [tokens(generate(pdd, p, DISAGG)) for p in prompts]  # first: the decode workers hold none of these prompts
    after = totals()
    assert disagg == [tokens(generate(pdd, p, AGG)) for p in prompts]
    pulled = (after[0] - before[0]) + (after[2] - before[2])
    assert pulled == sum(-(-len(p) // 16) for p in prompts), "every prompt's blocks were pulled by the decode worker that decoded it"
    assert (after[1], after[3], after[4]) == (before[1], before[3], before[4]), "no pull failed or was dropped: each handle was bound to its decode worker"
    wait_idle(pdd, "prefill-0", "decode-0", "decode-1")


async def test_a_decode_worker_without_a_kv_client_address_is_never_handed_kv(etcd):
    # simulated workers behind the real gateway: the decode worker registers as a version before
    # the binding did (no kv_client_address)
    fleet = SimFleet(etcd, "binding-old-decode", num_decode=1, num_prefill=1, timing=FAST, lease_ttl=3)
    (decoder,), (prefill,) = fleet.decode, fleet.prefill
    registration_of = decoder._registration

    def without_identity():
        reg = registration_of()
        reg.ClearField("kv_client_address")
        return reg

    decoder._registration = without_identity
    await fleet.start()
    gateway = InProcessGateway(etcd, "binding-old-decode", disagg_min_uncached_tokens=1)
    try:
        await gateway.start()
        await eventually(lambda: gateway.connected(2), "the gateway to connect to both simulated workers")
        prompt = list(range(7000, 7000 + 5 * 16))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gateway.generate(prompt, max_tokens=4, mode=gateway_pb2.SERVING_MODE_DISAGGREGATED)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "kv_client_address" in err.value.details()
        chunks = await gateway.generate(prompt, max_tokens=4, mode=gateway_pb2.SERVING_MODE_AUTO)  # decided: disaggregate
        assert sum(len(c.token_ids) for c in chunks) == 4 and gateway.pd_decisions().get("disaggregated") == 1
        assert prefill.leases.num_granted == 0, "no prefill worker computed KV that nobody could pull"
    finally:
        await gateway.stop()
        await fleet.stop()
