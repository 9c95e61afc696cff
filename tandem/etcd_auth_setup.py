"""Turn on etcd's user/password auth for one cluster: what `tandem up --tls` does to its own etcd.

    root      etcd's administrator (etcd requires it before auth can be enabled); password in
              DIR/etcd-root-password, for the operator's etcdctl only: no service uses it
    tandem    the services' user, with role tandem-<cluster>: readwrite on /tandem/<cluster>/
              and nothing else; password in DIR/etcd-password, given to services as a file

Passwords are random (secrets.token_urlsafe), written 0600 and reused when the files exist, so a
`tandem up --workdir` that finds its etcd data dir again finds the passwords that etcd knows.
Every step is idempotent (existing users get the file's password), so running it against an etcd
whose auth is already on works too: it then logs in as root first.

It speaks etcd's Auth API through aetcd's generated stubs: Debian's etcd-server ships no etcdctl.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
from aetcd import rpc

from services.common.etcd_auth import EtcdCredentials
from services.common.etcd_client import EtcdClient
from services.common.registry import parse_endpoint
from services.common.tls import TlsFiles

ROOT_USER = "root"
SERVICE_USER = "tandem"
CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class EtcdAuthFiles:
    username: str  # what services take as etcd_username
    password_file: Path  # ... and as etcd_password_file
    root_password_file: Path


def prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """[key, range_end) covering every key that starts with `prefix` (etcd's --prefix)."""
    key = prefix.encode()
    return key, key[:-1] + bytes([key[-1] + 1])


def load_or_create_password(path: Path) -> str:
    """The password in `path`; a new random one, written 0600 from the start, when there is none."""
    if path.exists():
        return path.read_text().rstrip("\r\n")
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


def enable_auth(endpoint: str, cluster: str, directory: Path, tls: TlsFiles | None = None, username: str = SERVICE_USER) -> EtcdAuthFiles:
    """Create root and `username` (limited to /tandem/<cluster>/) in the etcd at `endpoint` and
    enable auth. Raises RuntimeError saying what went wrong (e.g. auth already on with another
    root password)."""
    return asyncio.run(enable_auth_async(endpoint, cluster, Path(directory), tls, username))


async def enable_auth_async(endpoint: str, cluster: str, directory: Path, tls: TlsFiles | None = None, username: str = SERVICE_USER) -> EtcdAuthFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = EtcdAuthFiles(username, directory / "etcd-password", directory / "etcd-root-password")
    root_password = load_or_create_password(files.root_password_file)
    password = load_or_create_password(files.password_file)
    host, port = parse_endpoint(endpoint)
    # first unauthenticated (a fresh etcd); when etcd answers "user name is empty", auth is on already: as root
    for login in (None, EtcdCredentials(ROOT_USER, root_password)):
        client = EtcdClient(host=host, port=port, timeout=CALL_TIMEOUT_S, tls=tls, credentials=login)
        try:
            await client.connect()
            await _configure(rpc.AuthStub(client.channel), client.metadata, root_password, username, password, cluster)
            return files
        except rpc.AioRpcError as e:
            if login is None and "user name is empty" in (e.details() or ""):
                continue
            raise RuntimeError(f"could not set up etcd auth at {endpoint}: {e.details()}") from None
        except Exception as e:  # noqa: BLE001 - aetcd's errors from connect (wrong root password, etcd down)
            hint = f"; etcd's auth is on with a root password other than {files.root_password_file}'s" if "authentication failed" in str(e) else ""
            raise RuntimeError(f"could not set up etcd auth at {endpoint}: {e}{hint}") from None
        finally:
            await client.close()
    raise AssertionError("unreachable")


async def _configure(stub: rpc.AuthStub, metadata, root_password: str, username: str, password: str, cluster: str) -> None:
    role = f"tandem-{cluster}"
    key, range_end = prefix_range(f"/tandem/{cluster}/")

    async def call(method, request, exists: str | None = None) -> bool:
        """True when done; False when etcd says it `exists` already."""
        try:
            await method(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            return True
        except grpc.aio.AioRpcError as e:
            if exists is not None and exists in (e.details() or ""):
                return False
            raise

    async def user(name: str, secret: str, role_name: str) -> None:
        if not await call(stub.UserAdd, rpc.AuthUserAddRequest(name=name, password=secret), exists="user name already exists"):
            await call(stub.UserChangePassword, rpc.AuthUserChangePasswordRequest(name=name, password=secret))
        await call(stub.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=name, role=role_name))

    if metadata is None:  # auth is off. (When on, we are root already: changing its password would end our token)
        await call(stub.RoleAdd, rpc.AuthRoleAddRequest(name="root"), exists="role name already exists")
        await user(ROOT_USER, root_password, "root")
    await call(stub.RoleAdd, rpc.AuthRoleAddRequest(name=role), exists="role name already exists")
    permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=key, range_end=range_end)
    await call(stub.RoleGrantPermission, rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission))
    await user(username, password, role)
    await call(stub.AuthEnable, rpc.AuthEnableRequest())
