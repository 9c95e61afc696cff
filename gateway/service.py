"""The gateway's gRPC servicer: tandem.v1.Gateway (Generate, ListWorkers) over the request path.

Thin on purpose: it authenticates the call (API keys), hands Generate to the request path
(gateway/request_path.py: admit → tokenize → route → prefill leg → decode leg), which the OpenAI
HTTP front door (gateway/openai_api/) drives too, and turns its RequestError into the call's
status. It owns what the request path runs on: the worker pool (etcd watch, Watch streams), the
router with its live configuration, the metrics.
"""

from __future__ import annotations

import asyncio
import random

import grpc

from protos.tandem.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.config import ServiceConfig
from services.common.errors import RequestError
from services.common.keepalive import Keepalive
from services.common.metrics import GatewayMetrics
from services.common.tls import TlsFiles

from .api_keys import ApiKeys, KeyCheck
from .outlier_detection import OutlierDetectionConfig, OutlierDetector
from .request_path import RequestPath
from .scheduling.live_config import LiveSchedulingConfig
from .scheduling.router import Router
from .scheduling.scheduling_config import DisaggregationConfig, SchedulingConfig, load_file
from .worker_pool import WorkerPool


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    service_names = (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,)

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.metrics_registry = self.metrics.registry
        outliers = OutlierDetector(
            OutlierDetectionConfig(config.outlier_consecutive_failures, config.outlier_base_ejection_seconds,
                                   config.outlier_max_ejection_seconds, config.outlier_max_ejection_percent),
            on_eject=lambda handle, seconds: self.metrics.worker_ejections.labels(handle.worker_id, handle.role).inc(),
        )  # fmt: skip
        self.pool = WorkerPool(config.etcd, config.cluster, on_change=self._count_workers, outliers=outliers, tls=TlsFiles.from_config(config),
                               keepalive=Keepalive.from_config(config))  # fmt: skip
        base = SchedulingConfig(policy=config.routing_policy, disaggregation=DisaggregationConfig(min_uncached_tokens=config.disagg_min_uncached_tokens))
        if config.scheduling_config:
            base = load_file(config.scheduling_config, base)
        self.router = Router(base, self.pool.index, random.Random())
        self.live_config = LiveSchedulingConfig(config.etcd, config.cluster, base, self.router.configure)
        self.path = RequestPath(config, self.pool, self.router, self.metrics)
        self.api_keys = ApiKeys.from_setting(config.api_keys)
        self.front_doors = ()
        if config.http_port:
            from .openai_api.server import OpenAIServer  # aiohttp is imported only where HTTP is served

            self.front_doors = (OpenAIServer(self, config),)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)

    async def start(self) -> None:
        await self.pool.start()
        self.live_config.start()
        await asyncio.wait_for(self.live_config.synced.wait(), 30)

    def fill_registration(self, reg) -> None:
        pass

    async def close(self) -> None:
        await self.path.close()
        await self.live_config.stop()
        await self.pool.close()

    def _count_workers(self, pool: WorkerPool) -> None:
        for role in ("tokenizer", "prefill", "decode"):
            self.metrics.workers.labels(role).set(len(pool.registered(role)))

    # ---- Generate -------------------------------------------------------------------------------

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._authenticate(context)
        try:
            async for chunk in self.generate(request, context):
                yield chunk
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def _authenticate(self, context) -> None:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        check = self.api_keys.check(authorization if isinstance(authorization, str) else None)
        if check is KeyCheck.MISSING:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this gateway requires an API key: send the metadata `authorization: Bearer <key>`")
        if check is KeyCheck.INVALID:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key in the `authorization` metadata is not valid (expected `Bearer <key>`)")

    def generate(self, request: gateway_pb2.GenerateRequest, context):
        """The request path's chunks (RequestPath.generate): what both front doors serve."""
        return self.path.generate(request, context)

    @property
    def num_in_flight(self) -> int:
        """Requests this gateway is serving (both front doors)."""
        return self.path.admission.num_in_flight

    def served_models(self) -> dict[str, int]:
        """The models the registered decode workers serve, with the smallest context among them."""
        return self.pool.served_models()

    # ---- ListWorkers ----------------------------------------------------------------------------

    async def ListWorkers(self, request, context):
        await self._authenticate(context)
        reply = gateway_pb2.ListWorkersResponse()
        for h in self.pool.workers.values():
            status = gateway_pb2.WorkerStatus(
                registration=h.registration, num_in_flight=h.num_in_flight, num_indexed_blocks=self.pool.index.num_held(h.worker_id)
            )
            if h.load is not None:
                status.load.CopyFrom(h.load)
            reply.workers.append(status)
        return reply
