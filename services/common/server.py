"""The gRPC server bootstrap every Tandem service runs: `run(config, service)`.

    start:    tracing → /metrics → grpc.aio server (health NOT_SERVING, reflection) and the
              service's other front doors → service.start() (model load) → etcd registration
              → health SERVING
    SIGTERM:  health NOT_SERVING → revoke the etcd lease (the gateway stops routing here at once)
              → drain: no new RPCs or connections, in-flight ones get `drain_timeout` seconds (gRPC
              and the other front doors together) → service.close() (the engine) → /metrics off
              → flush spans
    failure:  a service whose `wait_failed()` returns (a worker's engine thread died) is shut down
              in the same order with a short drain, and the process exits with code 1 so that its
              supervisor restarts it

The service supplies its servicers, its registration details and its start/close; everything
else (signals, ordering, logging) lives here once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Protocol

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from protos.tandem.v1 import common_pb2

from .config import ServiceConfig
from .errors import ErrorStatusInterceptor
from .etcd_auth import check_access as check_etcd_access
from .etcd_auth import credentials_from_config, set_client_credentials
from .etcd_tls import set_client_tls
from .keepalive import Keepalive
from .metrics import MetricsServer
from .peer_roles import PeerRoleInterceptor
from .registry import Registration, encode_registration, worker_key
from .request_decoding import RequestDecodingInterceptor
from .telemetry import server_interceptors, setup_tracing
from .tls import TlsFiles, server_credentials

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# streams of long generations and big prompts: allow large messages both ways
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
# with the default keepalive (keepalive.py): servers that are not built from a ServiceConfig (the
# simulated workers) still accept the gateway's pings
GRPC_OPTIONS = [*MESSAGE_OPTIONS, *Keepalive().server_options()]


class Service(Protocol):
    service_names: tuple[str, ...]  # fully qualified gRPC service names (health and reflection)
    metrics_registry: object  # a prometheus_client CollectorRegistry

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    def fill_registration(self, reg: common_pb2.WorkerRegistration) -> None: ...

    async def close(self) -> None: ...

    # optional: `interceptors` (grpc.aio server interceptors of the service's own) and
    # `async def wait_failed() -> str`, which returns when the service can no longer serve


# after a failure, in-flight RPCs already ended with UNAVAILABLE: the drain only lets those
# answers and the Watch streams' ends reach their callers
FAILURE_DRAIN_S = 1.0
EXIT_FAILED = 1


class FrontDoor(Protocol):
    """A listener a service serves beside gRPC (the gateway's OpenAI HTTP API), found as the
    service's optional `front_doors` attribute; it shares the gRPC server's lifecycle."""

    async def start(self) -> None: ...  # listen; raise OSError when the port is taken

    def set_serving(self, serving: bool) -> None: ...  # follows grpc.health SERVING / NOT_SERVING

    async def stop(self) -> None: ...  # stop accepting, let in-flight requests finish (drain_timeout), close


def setup_logging(config: ServiceConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {config.role}[%(process)d] %(name)s: %(message)s",
    )


class ServiceRunner:
    """Runs one service until stop() (or SIGTERM/SIGINT), then shuts it down in order."""

    def __init__(self, config: ServiceConfig, service: Service):
        self.config, self.service = config, service
        self.stop_requested = asyncio.Event()
        self.health = HealthServicer()
        self.registration: Registration | None = None
        self.server: grpc.aio.Server | None = None
        self.front_doors: tuple[FrontDoor, ...] = tuple(getattr(service, "front_doors", ()))
        self.exit_code = 0  # EXIT_FAILED after a failure: the process must be restarted

    def stop(self) -> None:
        self.stop_requested.set()

    async def _set_health(self, status) -> None:
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)
        for door in self.front_doors:
            door.set_serving(status == health_pb2.HealthCheckResponse.SERVING)

    async def run(self) -> None:
        config, service = self.config, self.service
        provider = setup_tracing(f"tandem-{config.role}")
        metrics = MetricsServer(service.metrics_registry)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        # outermost first: errors that escape a handler (or the service's own interceptors) become
        # statuses, and undecodable request bytes INVALID_ARGUMENT (errors.py, request_decoding.py)
        # with TLS on, the peer's certificate role is checked before any handler runs (peer_roles.py)
        tls = TlsFiles.from_config(config)
        set_client_tls(tls)  # etcd at https://... is dialed with this service's certificate
        set_client_credentials(credentials_from_config(config))  # and as its etcd user, if set (etcd_auth.py)
        await check_etcd_access(config.etcd, config.cluster)  # refused credentials: one clear error now, not after the model load
        authz = [PeerRoleInterceptor()] if tls is not None else []
        interceptors = [*server_interceptors(), *authz, ErrorStatusInterceptor(), RequestDecodingInterceptor(), *getattr(service, "interceptors", ())]
        options = [*MESSAGE_OPTIONS, *Keepalive.from_config(config).server_options()]
        server = self.server = grpc.aio.server(interceptors=interceptors, options=options)
        drain_timeout = config.drain_timeout
        try:
            service.add_to_server(server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            names = (*service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
            try:
                if tls is None:
                    server.add_insecure_port(config.bind_address)
                else:  # workers require a client certificate; the gateway's API uses API keys (tls.py)
                    server.add_secure_port(config.bind_address, server_credentials(tls, require_client_auth=config.role != "gateway"))
            except RuntimeError as e:
                raise RuntimeError(f"cannot listen on {config.bind_address} (is the port in use? set --port): {e}") from None
            await server.start()
            for door in self.front_doors:
                await door.start()
            metrics.start(config.host, config.metrics_port)
            log.info("listening on %s (%s); starting the %s service", config.bind_address, "TLS" if tls else "plaintext", config.role)
            t0 = time.perf_counter()
            await service.start()
            if hasattr(service, "mark_ready"):  # workers answer UNAVAILABLE until here (engine_failure.py)
                service.mark_ready()
            reg = common_pb2.WorkerRegistration(
                worker_id=config.worker_id,
                role=config.role,
                grpc_address=config.address,
                metrics_address=config.metrics_address,
                started_unix_ms=int(time.time() * 1000),
                version=VERSION,
            )
            service.fill_registration(reg)
            key = worker_key(config.cluster, config.role, config.worker_id)
            self.registration = Registration(config.etcd, key, encode_registration(reg), config.lease_ttl)
            await self.registration.start()
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("%s %s serving at %s (ready in %.1fs)", config.role, config.worker_id, config.address, time.perf_counter() - t0)
            failure = await self._wait_stop_or_failure()
            if failure is not None:
                self.exit_code, drain_timeout = EXIT_FAILED, min(drain_timeout, FAILURE_DRAIN_S)
                log.error("%s %s failed (%s): not serving, revoking the lease, exiting with code %d", config.role, config.worker_id, failure, EXIT_FAILED)
            else:
                log.info("shutting down: not serving, revoking the lease, draining for up to %.0fs", drain_timeout)
        finally:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.registration is not None:
                await self.registration.stop()
            await asyncio.gather(server.stop(grace=drain_timeout), *(door.stop() for door in self.front_doors))
            await service.close()
            metrics.stop()
            provider.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("stopped")

    async def _wait_stop_or_failure(self) -> str | None:
        """Wait for stop() or the service's failure; returns the failure (None: a stop)."""
        wait_failed = getattr(self.service, "wait_failed", None)
        if wait_failed is None:
            await self.stop_requested.wait()
            return None
        stop, failed = asyncio.ensure_future(self.stop_requested.wait()), asyncio.ensure_future(wait_failed())
        try:
            await asyncio.wait((stop, failed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, failed):
                task.cancel()
            await asyncio.gather(stop, failed, return_exceptions=True)
        return failed.result() if failed.done() and not failed.cancelled() else None


def run(config: ServiceConfig, service: Service) -> None:
    """Run `service` on uvloop until SIGTERM/SIGINT. Blocks; exits with code 1 (SystemExit)
    when the service failed and must be restarted."""
    setup_logging(config)
    runner = ServiceRunner(config, service)
    uvloop.run(runner.run())
    if runner.exit_code:
        raise SystemExit(runner.exit_code)
