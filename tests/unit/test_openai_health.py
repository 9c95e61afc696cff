"""GET /health is readiness (a request could be served now), GET /livez liveness (the process answers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.openai_api.server import OpenAIServer
from services.common.config import ServiceConfig


class Pool:
    def __init__(self, ready_decode: int = 0, registered_decode: int = 0, tokenizers: int = 0):
        self.counts = {"decode": (ready_decode, registered_decode), "tokenizer": (tokenizers, tokenizers)}

    def ready(self, role: str) -> list:
        return [object()] * self.counts.get(role, (0, 0))[0]

    def registered(self, role: str) -> list:
        return [object()] * self.counts.get(role, (0, 0))[1]


def make_server(pool: Pool, **settings) -> OpenAIServer:
    from services.common.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    service = SimpleNamespace(pool=pool, metrics=metrics, metrics_registry=metrics.registry, api_keys=None, served_models=dict)
    return OpenAIServer(service, ServiceConfig(role="gateway", **settings))


@pytest.mark.parametrize(
    "serving, pool, settings, status, says",
    [
        (False, Pool(1, 1, 1), {}, 503, "not serving"),
        (True, Pool(0, 0, 1), {}, 503, "no decode worker is ready (0 registered)"),
        (True, Pool(0, 2, 1), {}, 503, "no decode worker is ready (2 registered)"),
        (True, Pool(1, 1, 0), {}, 503, "no tokenizer service is registered"),
        (True, Pool(1, 1, 0), {"health_requires_tokenizer": 0}, 200, ""),
        (True, Pool(1, 2, 1), {}, 200, ""),
    ],
)
async def test_health_is_ready_only_when_a_request_could_be_served(serving, pool, settings, status, says):
    server = make_server(pool, **settings)
    server.set_serving(serving)
    async with TestClient(TestServer(server.app)) as client:
        r = await client.get("/health")
        assert r.status == status
        if says:
            body = await r.json()
            assert says in body["error"]["message"] and r.headers["Retry-After"] == "1"
        for path in ("/livez", "/health/live"):
            assert (await client.get(path)).status == 200  # alive whatever the readiness
