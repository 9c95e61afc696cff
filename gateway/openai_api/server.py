"""The gateway's OpenAI-compatible HTTP API: a second front door on the same request path.

    POST /v1/completions, /v1/chat/completions   completions.py (API key checked when configured)
    GET  /v1/models, /v1/models/{model}          the models the registered decode workers serve
    GET  /health                                 readiness: 200 when a request can be served (the gateway
                                                 is SERVING, a decode worker is ready and, unless
                                                 health_requires_tokenizer=0, a tokenizer is registered),
                                                 else 503 saying what is missing
    GET  /livez                                  liveness: 200 while the process runs (also /health/live)
    GET  /metrics                                the gateway's Prometheus registry (tandem_*)

aiohttp serves it in the gateway's process, on the same uvloop event loop as grpc.aio, started
and drained by ServiceRunner beside the gRPC server (services/common/server.py: FrontDoor). Its
handlers are cancelled when their client disconnects (handler_cancellation), which is how a
closed stream reaches the workers. Every error, 404s and 405s included, is an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.errors import RequestError

from ..api_keys import KeyCheck
from .completions import CompletionEndpoints
from .errors import ApiError, from_request_error
from .https import ReloadingServerContext
from .json_body import too_large

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"  # on 429 and 503: the load or the worker set may change any moment


class OpenAIServer:
    """The HTTP front door of one GatewayService (see services.common.server.FrontDoor)."""

    def __init__(self, service, config):
        self.service, self.config = service, config
        self.serving = False
        self.created = int(time.time())
        self.endpoints = CompletionEndpoints(service)
        self._runner: web.AppRunner | None = None
        # HTTPS with the gateway's certificate (--tls-cert/--tls-key), re-read when renewed (https.py)
        self.tls = ReloadingServerContext(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.max_body_bytes = config.http_max_body_bytes
        self.app = web.Application(middlewares=[self._errors_and_metrics, self._authenticate], client_max_size=self.max_body_bytes)
        self.app.router.add_post("/v1/completions", self.endpoints.completions)
        self.app.router.add_post("/v1/chat/completions", self.endpoints.chat_completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model:.+}", self.model)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/livez", self.live)
        self.app.router.add_get("/health/live", self.live)
        self.app.router.add_get("/metrics", self.metrics)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.config.advertise_host}:{self.config.http_port}/v1"

    # ---- lifecycle (ServiceRunner) --------------------------------------------------------------

    async def start(self) -> None:
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=self.config.drain_timeout, access_log=None)
        await runner.setup()
        self._runner = runner
        ssl_context = self.tls.context if self.tls is not None else None
        site = web.TCPSite(runner, self.config.host, self.config.http_port, reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            raise OSError(f"cannot listen for HTTP on {self.config.host}:{self.config.http_port} (is the port in use? set --http-port; 0 = off): {e}") from None
        log.info("OpenAI-compatible HTTP API at %s", self.url)

    def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def stop(self) -> None:
        """Stop accepting connections, let in-flight requests finish (up to drain_timeout), close."""
        self.serving = False
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ---- middlewares ----------------------------------------------------------------------------

    @web.middleware
    async def _errors_and_metrics(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        status = "499"  # the client went away first (nginx's code for it)
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        except ApiError as e:
            status = str(e.status)
            return self._error_response(e)
        except RequestError as e:
            err = from_request_error(e)
            status = str(err.status)
            return self._error_response(err)
        except web.HTTPException as e:  # aiohttp's own: no route (404), wrong method (405), body too large (413)
            status = str(e.status)
            message = f"{request.method} {request.path}: {e.reason}"
            if e.status == 413:
                return self._error_response(too_large(self.max_body_bytes))
            return self._error_response(ApiError(e.status, message, code=e.reason.lower().replace(" ", "_")))
        except asyncio.CancelledError:
            raise
        except Exception:
            error_id = "err-" + uuid.uuid4().hex[:12]  # what the client quotes; the log has the traceback
            log.exception("%s %s failed (X-Request-Id %r, error id %s)", request.method, request.path, request.headers.get("X-Request-Id", "")[:128], error_id)
            status = "500"
            return self._error_response(ApiError(500, f"internal error in the gateway (error id {error_id}); its log has the details", code="internal_error"))
        finally:
            self.service.metrics.http_requests.labels(route, status).inc()

    def _error_response(self, e: ApiError) -> web.Response:
        headers = {"Retry-After": RETRY_AFTER_S} if e.status in (429, 503) else None
        return web.json_response(e.to_json(), status=e.status, headers=headers)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        if request.path.startswith("/v1/"):
            check = self.service.api_keys.check(request.headers.get("Authorization"))
            if check is KeyCheck.MISSING:
                raise ApiError(401, "this server requires an API key: send the header `Authorization: Bearer <key>`", code="missing_api_key")
            if check is KeyCheck.INVALID:
                raise ApiError(401, "the API key in the Authorization header is not valid (expected `Bearer <key>`)", code="invalid_api_key")
        return await handler(request)

    # ---- the small endpoints --------------------------------------------------------------------

    def _model_json(self, name: str, max_model_len: int) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tandem", "root": name, "parent": None, "max_model_len": max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        served = self.service.served_models()
        return web.json_response({"object": "list", "data": [self._model_json(m, n) for m, n in sorted(served.items())]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        served = self.service.served_models()
        if name not in served:
            raise ApiError(404, f"the model {name!r} does not exist here; served: {', '.join(sorted(served)) or 'none (no decode worker is registered)'}",
                           param="model", code="model_not_found")  # fmt: skip
        return web.json_response(self._model_json(name, served[name]))

    def not_ready(self) -> str | None:
        """Why no request could be served now, or None when one can (readiness, as vLLM's /health)."""
        if not self.serving:
            return "the gateway is not serving (starting or shutting down)"
        pool = self.service.pool
        if not pool.ready("decode"):
            return f"no decode worker is ready ({len(pool.registered('decode'))} registered)"
        if self.config.health_requires_tokenizer and not pool.registered("tokenizer"):
            return "no tokenizer service is registered (text and chat prompts cannot be served)"
        return None

    async def health(self, request: web.Request) -> web.Response:
        reason = self.not_ready()
        if reason is not None:
            raise ApiError(503, reason, code="unavailable")
        return web.Response(status=200)

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the process and its event loop answer (restart it when this fails)."""
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.service.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
