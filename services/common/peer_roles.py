"""Who may call what: the peer's certificate names its role, and each RPC names the roles it serves.

    mTLS handshake (tls.py: client certificate signed by the cluster CA, required)
        └─► auth_context: x509_subject_alternative_name = ["tandem-gateway", "localhost", ...]
              └─► roles {"gateway"} ──► POLICY[method] ∋ role? ── no ──► PERMISSION_DENIED

A role is a DNS SAN `tandem-<role>` (tandem/certs.py writes one per certificate); the CA is the
only authority, so a certificate's SAN is trusted once the handshake verified its chain. Methods
not listed below are refused for everyone (fail closed): a new RPC must be given its roles here.
The gateway's own API, health and reflection are public — the gateway authenticates its clients
with API keys, and probes (kubelet, load balancers) carry no certificate.
"""

from __future__ import annotations

import grpc

from .errors import wrap_behavior

ROLE_SAN_PREFIX = "tandem-"
PUBLIC = frozenset({"*"})

# exact method names first, then "/package.Service/" prefixes
POLICY: dict[str, frozenset[str]] = {
    "/tandem.v1.Gateway/": PUBLIC,
    "/grpc.health.v1.Health/": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/": PUBLIC,
    "/tandem.v1.Tokenizer/": frozenset({"gateway"}),
    "/tandem.v1.Decode/": frozenset({"gateway"}),
    "/tandem.v1.Prefill/Prefill": frozenset({"gateway"}),
    # the decode worker that pulled the blocks releases them; the gateway releases a handle whose
    # decode leg never started (client gone, decode worker already held the prefix)
    "/tandem.v1.Prefill/ReleaseKV": frozenset({"decode", "gateway"}),
    # load, KV events and CheckIntegrity are admin RPCs: the gateway's pool only
    "/tandem.v1.Worker/": frozenset({"gateway"}),
}


def role_identity(role: str) -> str:
    """The DNS SAN naming `role` in a certificate, and the name a client checks on a server."""
    return ROLE_SAN_PREFIX + role


def allowed_roles(method: str) -> frozenset[str]:
    """Roles that may call `method` (PUBLIC: anyone; empty: nobody)."""
    if method in POLICY:
        return POLICY[method]
    service = method[: method.rfind("/") + 1]
    return POLICY.get(service, frozenset())


def roles_of(auth_context: dict) -> frozenset[str]:
    """The roles a verified peer certificate names (its `tandem-<role>` DNS SANs)."""
    roles = set()
    for raw in auth_context.get("x509_subject_alternative_name", ()):
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if name.startswith(ROLE_SAN_PREFIX) and len(name) > len(ROLE_SAN_PREFIX):
            roles.add(name[len(ROLE_SAN_PREFIX) :])
    return frozenset(roles)


def denial(method: str, roles: frozenset[str]) -> str | None:
    """Why a peer of `roles` may not call `method` (None: it may). Names the roles, never the
    certificate's other contents."""
    allowed = allowed_roles(method)
    if allowed is PUBLIC or roles & allowed:
        return None
    who = f"role {', '.join(sorted(roles))}" if roles else "a peer without a Tandem role certificate"
    if not allowed:
        return f"{method} is not callable by any peer"
    return f"{method} is for the {' or '.join(sorted(allowed))} role only; {who} may not call it"


def _guard(behavior, method: str, streaming: bool):
    async def check(context) -> None:
        reason = denial(method, roles_of(context.auth_context()))
        if reason is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    if streaming:

        async def guarded_stream(request_or_iterator, context):
            await check(context)
            async for response in behavior(request_or_iterator, context):
                yield response

        return guarded_stream

    async def guarded(request_or_iterator, context):
        await check(context)
        return await behavior(request_or_iterator, context)

    return guarded


class PeerRoleInterceptor(grpc.aio.ServerInterceptor):
    """Refuses an RPC whose caller's certificate does not name a role POLICY allows for it."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or allowed_roles(method) is PUBLIC:
            return handler
        return wrap_behavior(handler, lambda b: _guard(b, method, handler.response_streaming))
