"""etcd with user/password auth on (what `tandem up --tls` sets up): the right password registers
and watches, a wrong one or a missing permission stops a service at once with one line naming the
setting, the token is renewed after etcd restarts, and the password never shows in errors or argv.
A real etcd on free ports; services as real processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aetcd
import pytest

from services.common import etcd_auth
from services.common.etcd_auth import EtcdAuthError, EtcdCredentials
from services.common.registry import Registration, RegistryWatcher, parse_endpoint, worker_key
from tandem.etcd_auth_setup import ROOT_USER, enable_auth, load_or_create_password
from tandem.etcd_process import EtcdProcess
from tandem.launcher import free_ports
from tests.helpers.waiting import eventually

CLUSTER = "auth"


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    """(etcd process, its auth files): auth on, user `tandem` limited to /tandem/auth/."""
    d = tmp_path_factory.mktemp("etcd-auth")
    client_port, peer_port = free_ports(2)
    proc = EtcdProcess(d / "data", client_port, peer_port, d / "etcd.log")
    proc.start()
    try:
        proc.wait_healthy()
        files = enable_auth(proc.endpoint, CLUSTER, d / "secrets")
        yield proc, files
    finally:
        proc.stop()


@pytest.fixture
def login():
    """login(user, password) makes every client of this process authenticate so; reset after."""
    yield lambda user, password: etcd_auth.set_client_credentials(EtcdCredentials(user, password) if user else None)
    etcd_auth.set_client_credentials(None)


def service_credentials(files) -> tuple[str, str]:
    return files.username, files.password_file.read_text().strip()


async def test_the_right_password_registers_and_watches(auth_etcd, login):
    proc, files = auth_etcd
    login(*service_credentials(files))
    seen: dict[str, str] = {}

    def on_event(event):
        if event.kind == "snapshot":
            seen.clear()
            seen.update({k: r.role for k, r in event.registrations.items()})
        elif event.kind == "put":
            seen[event.key] = event.registration.role
        else:
            seen.pop(event.key, None)

    watcher = RegistryWatcher(proc.endpoint, CLUSTER, on_event)
    watcher.start()
    key = worker_key(CLUSTER, "decode", "d-1")
    reg = Registration(proc.endpoint, key, b'{"role": "decode"}', ttl=3)
    try:
        await asyncio.wait_for(watcher.synced.wait(), 10)
        await reg.start(timeout=10)
        await eventually(lambda: seen.get(key) == "decode", "the watcher to see the registration")
        await reg.stop()
        await eventually(lambda: key not in seen, "the revoked lease to delete the key")
    finally:
        await reg.stop()
        await watcher.stop()


@pytest.mark.parametrize("user, password, expected", [
    ("tandem", "not-the-password-3141", "wrong password or no such user"),
    ("nobody", "not-the-password-3141", "wrong password or no such user"),
    (None, None, "requires authentication"),
])  # fmt: skip
async def test_refused_credentials_stop_registration_at_once_naming_the_setting(auth_etcd, login, user, password, expected):
    proc, _ = auth_etcd
    login(user, password)
    with pytest.raises(EtcdAuthError) as err:  # not a TimeoutError after 30 s of retries
        await Registration(proc.endpoint, worker_key(CLUSTER, "decode", "d-2"), b"{}", ttl=3).start(timeout=30)
    message = str(err.value)
    assert expected in message and ("etcd_username" in message or "etcd_password_file" in message), message
    assert "not-the-password" not in message
    with pytest.raises(EtcdAuthError):
        await etcd_auth.check_access(proc.endpoint, CLUSTER)


async def test_a_user_whose_role_lacks_the_prefix_is_permission_denied(auth_etcd, login):
    proc, files = auth_etcd
    login(*service_credentials(files))  # its role covers /tandem/auth/ only
    with pytest.raises(EtcdAuthError, match="denied etcd user 'tandem' permission.*grant-permission"):
        await Registration(proc.endpoint, worker_key("another-cluster", "decode", "d-3"), b"{}", ttl=3).start(timeout=30)
    with pytest.raises(EtcdAuthError, match="permission to read /tandem/another-cluster/"):
        await etcd_auth.check_access(proc.endpoint, "another-cluster")
    await etcd_auth.check_access(proc.endpoint, CLUSTER)  # its own cluster: fine


async def test_registration_authenticates_again_after_etcd_restarts(auth_etcd, login):
    """etcd forgets auth tokens when it restarts: the keep-alive must log in again, not retry a dead token forever."""
    proc, files = auth_etcd
    login(*service_credentials(files))
    key = worker_key(CLUSTER, "prefill", "p-1")
    reg = Registration(proc.endpoint, key, b"{}", ttl=3)
    await reg.start(timeout=10)
    try:
        await asyncio.to_thread(proc.stop)
        proc.start()
        await asyncio.to_thread(proc.wait_healthy)
        host, port = parse_endpoint(proc.endpoint)
        root = aetcd.Client(host=host, port=port, timeout=5, username=ROOT_USER, password=files.root_password_file.read_text().strip())
        async with root:  # drop the key behind its back: re-putting it needs a valid token
            await root.revoke_lease(reg._lease_id)
            await eventually(lambda: reg.num_registrations >= 2, "the registration to come back", timeout=20)
            assert (await root.get(key.encode())) is not None
    finally:
        await reg.stop()


def test_tandem_serve_with_a_wrong_password_exits_with_one_clear_line(auth_etcd, tmp_path):
    proc, _ = auth_etcd
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password-2718\n")
    wrong.chmod(0o600)
    port, http_port = free_ports(2)
    cmd = [sys.executable, "-m", "tandem", "serve", "gateway", "--etcd", proc.endpoint, "--cluster", CLUSTER, "--port", str(port),
           "--http-port", str(http_port), "--metrics-port", "0", "--etcd-username", "tandem", "--etcd-password-file", str(wrong)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "tandem: error: etcd at" in output and "etcd_password_file" in output, output
    assert "Traceback" not in output and "not-the-password" not in output


def test_tandem_scheduling_authenticates_from_the_environment(auth_etcd, capsys, monkeypatch):
    from tandem.cli import main

    proc, files = auth_etcd
    monkeypatch.setenv("TANDEM_ETCD_PASSWORD", files.password_file.read_text().strip())
    assert main(["scheduling", "--etcd", proc.endpoint, "--cluster", CLUSTER, "--etcd-username", "tandem", "show"]) == 0
    monkeypatch.setenv("TANDEM_ETCD_PASSWORD", "not-the-password-1618")
    assert main(["scheduling", "--etcd", proc.endpoint, "--cluster", CLUSTER, "--etcd-username", "tandem", "show"]) == 2
    err = capsys.readouterr().err
    assert "refused user 'tandem'" in err and "not-the-password" not in err


def test_setting_auth_up_again_keeps_the_passwords_and_works_when_auth_is_on(auth_etcd):
    proc, files = auth_etcd
    before = files.password_file.read_text()
    again = enable_auth(proc.endpoint, CLUSTER, files.password_file.parent)  # logs in as root this time
    assert again.password_file.read_text() == before
    assert oct(files.password_file.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_password(files.password_file) == before.strip()
