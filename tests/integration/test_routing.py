"""The prefix-aware policy sends a prompt to the decode worker that already holds its prefix."""

from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow


def test_prefix_aware_routing_reuses_the_warm_workers_cache(tmp_path, default_model_dir):
    role_args = {"gateway": ["--routing-policy", "prefix-aware"]}
    with running_cluster(tmp_path, num_prefill=0, num_decode=2, role_args=role_args) as c, grpc.insecure_channel(c.gateway_address) as ch:
        gateway = gateway_pb2_grpc.GatewayStub(ch)
        shared = [2000 + (i * 31) % 20000 for i in range(16 * 8)]  # an 8-block "system prompt"

        def ask(suffix_start: int) -> common_pb2.Usage:
            ids = shared + [suffix_start + i for i in range(20)]
            request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0))
            return list(gateway.Generate(request, timeout=60))[-1].usage

        assert ask(30000).cached_prompt_tokens == 0

        def indexed() -> dict[str, int]:
            reply = gateway.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
            return {w.registration.worker_id: w.num_indexed_blocks for w in reply.workers if w.registration.role == "decode"}

        wait_for(lambda: max(indexed().values()) >= 8, "the gateway to learn where the prefix is cached")
        # sequential requests sharing the prefix: every one lands where the prefix is (with
        # least-loaded routing each would have an even chance of the cold worker)
        for i in range(6):
            assert ask(31000 + 100 * i).cached_prompt_tokens == 16 * 8, f"request {i} missed the cached prefix"
        counts = indexed()
        assert sorted(counts.values())[0] == 0, f"the cold worker should never have been used: {counts}"
