"""etcd user/password authentication: where the password comes from, and what etcd's refusals mean.

    etcd_username        the etcd user (setting; TANDEM_ETCD_USERNAME)
    etcd_password_file   a file holding its password (setting; Kubernetes/compose secrets mount one)
    TANDEM_ETCD_PASSWORD the password itself, from the environment only

The password is never a command-line value (every user of the host reads argv in /proc), never
logged and never part of an error message. One process has one etcd identity, as it has one TLS
identity (etcd_tls.py): ServiceRunner and `tandem scheduling` call set_client_credentials once and
every client make_client builds authenticates with it (etcd_client.py).

etcd answers a wrong password, a missing user or a missing permission with a gRPC error that no
retry fixes. explain_refusal turns those into EtcdAuthError, a ValueError that names the settings
to fix, so that a service stops at startup with one clear line instead of retrying forever.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PASSWORD_ENV = "TANDEM_ETCD_PASSWORD"
HOW_TO_SET = f"set etcd_username and etcd_password_file (or the {PASSWORD_ENV} environment variable)"


@dataclass(frozen=True)
class EtcdCredentials:
    username: str
    password: str = field(repr=False)  # repr(), logs and tracebacks show the user only


class EtcdAuthError(ValueError):
    """etcd refused this process's identity or permissions: retrying cannot help, the settings must change."""


_credentials: EtcdCredentials | None = None


def set_client_credentials(credentials: EtcdCredentials | None) -> None:
    global _credentials
    _credentials = credentials


def client_credentials() -> EtcdCredentials | None:
    return _credentials


def credentials_from_config(config, environ: Mapping[str, str] | None = None) -> EtcdCredentials | None:
    """The credentials `config` (a ServiceConfig or the `tandem scheduling` arguments: anything
    with etcd_username and etcd_password_file) names; None when no user is set. Raises ValueError
    naming the setting when the user has no password or the file cannot be read."""
    environ = os.environ if environ is None else environ
    username = (getattr(config, "etcd_username", "") or "").strip()
    path = getattr(config, "etcd_password_file", "") or ""
    from_env = environ.get(PASSWORD_ENV)
    if not username:
        if path or from_env:
            raise ValueError(f"etcd_password_file / {PASSWORD_ENV} is set but etcd_username is not: set the etcd user too")
        return None
    if path and from_env:
        raise ValueError(f"both etcd_password_file and {PASSWORD_ENV} are set: keep one")
    if path:
        password = _read_password_file(path)
    elif from_env:
        password = from_env
    else:
        raise ValueError(f"etcd_username {username!r} has no password: set etcd_password_file (a file holding it) or {PASSWORD_ENV}")
    return EtcdCredentials(username, password)


def _read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            password = fh.read().rstrip("\r\n")  # editors and `echo` add a final newline
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"etcd_password_file: cannot read {path!r} ({e.strerror})") from None
    if not password:
        raise ValueError(f"etcd_password_file: {path!r} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and not os.path.islink(path):  # Kubernetes mounts secrets as links
        log.warning("etcd_password_file %s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    return password


# etcd 3.4's messages (etcdserver/api/v3rpc/rpctypes) for refusals that no retry fixes.
# "invalid auth token" is not one: tokens die with an etcd restart, and reconnecting gets a new one.
_AUTH_FAILED = "authentication failed"
_USER_EMPTY = "user name is empty"
_PERMISSION_DENIED = "permission denied"


def explain_refusal(error: BaseException, endpoint: str, action: str) -> EtcdAuthError | None:
    """An EtcdAuthError saying what to fix when `error` (from aetcd, grpc, or either's cause) is
    etcd refusing our credentials or permissions while we tried to `action`; else None (an
    outage or another error, which the caller retries)."""
    text = " ".join(str(e) for e in _chain(error)).lower()
    credentials = client_credentials()
    if _AUTH_FAILED in text:
        user = credentials.username if credentials else "?"
        return EtcdAuthError(f"etcd at {endpoint} refused user {user!r}: wrong password or no such user; "
                             f"check etcd_username and the password in etcd_password_file / {PASSWORD_ENV}")  # fmt: skip
    if _USER_EMPTY in text:
        return EtcdAuthError(f"etcd at {endpoint} requires authentication (could not {action}): {HOW_TO_SET}")
    if _PERMISSION_DENIED in text:
        who = f"etcd user {credentials.username!r}" if credentials else "this client (no etcd_username: etcd took its certificate's name as the user)"
        return EtcdAuthError(f"etcd at {endpoint} denied {who} permission to {action}: "
                             "grant the user's role readwrite on the cluster's prefix (etcdctl role grant-permission ROLE --prefix readwrite /tandem/CLUSTER/)")  # fmt: skip
    return None


def _chain(error: BaseException):
    seen = 0
    while error is not None and seen < 5:  # aetcd wraps grpc's AioRpcError as __cause__
        yield error
        details = getattr(error, "details", None)
        if callable(details):
            try:
                yield RuntimeError(details() or "")
            except Exception:  # noqa: BLE001 - only a message is wanted
                pass
        error, seen = error.__cause__ or error.__context__, seen + 1


async def check_access(endpoint: str, cluster: str, timeout: float = 5.0) -> None:
    """Read the cluster's prefix once, so that refused credentials or permissions stop a service
    at startup (EtcdAuthError) instead of after its model load, in a retry loop. An unreachable
    etcd is not an error here: services start before etcd and register once it answers."""
    import asyncio

    from .registry import make_client  # registry imports this module

    client = make_client(endpoint)
    try:
        await asyncio.wait_for(client.get(f"/tandem/{cluster}/".encode()), timeout)
    except Exception as e:  # noqa: BLE001 - classify below; anything else is an outage
        refusal = explain_refusal(e, endpoint, f"read /tandem/{cluster}/")
        if refusal is not None:
            raise refusal from None
        log.info("etcd at %s not reachable at startup (%s); registering once it is", endpoint, e)
    finally:
        try:
            await asyncio.wait_for(client.close(), timeout)
        except Exception:  # noqa: BLE001 - closing a dead channel can fail; nothing leaks
            pass
