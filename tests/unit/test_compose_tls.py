"""docker-compose.tls.yml, merged over docker-compose.yml the way its header says to run it:
docker-compose accepts the pair, every service gets its own certificate as real TLS settings,
etcd serves TLS to certificates of the CA only, and every healthcheck still reaches its service.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest
import yaml

from services.common.config import DEFAULT_GRPC_PORTS, ROLES
from tandem import certs
from tandem.cli import build_parser
from tests.unit.test_deployment import ROOT, config_fields

TLS_FILE = ROOT / "docker-compose.tls.yml"
CERTS_DIR = "/certs"  # where containers see ./certs


@functools.cache
def merged() -> dict:
    """What `docker compose -f docker-compose.yml -f docker-compose.tls.yml config` resolves."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install --no-install-recommends docker-compose): cannot merge the files")
    result = subprocess.run([exe, "-f", "docker-compose.yml", "-f", TLS_FILE.name, "config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docker-compose config of the TLS override exited {result.returncode}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def mounts(svc: dict) -> dict[str, str]:
    """container path → host path of the service's bind mounts."""
    found = {}
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            found[rest.split(":")[0]] = source
        else:
            found[volume["target"]] = volume.get("source", "")
    return found


def test_the_override_merges_over_the_base_file():
    assert set(merged()["services"]) >= {"etcd", *ROLES}


@pytest.mark.parametrize("role", ROLES)
def test_every_service_runs_with_its_own_certificate_from_tandem_certs(role):
    svc = merged()["services"][role]
    env, mounted = svc["environment"], mounts(svc)
    own = certs.role_files(CERTS_DIR, role)
    assert env["TANDEM_TLS_CERT"] == str(own.cert) and env["TANDEM_TLS_KEY"] == str(own.key), env
    assert env["TANDEM_TLS_CA"] == str(certs.ca_file(CERTS_DIR))
    for path in (env["TANDEM_TLS_CERT"], env["TANDEM_TLS_KEY"], env["TANDEM_TLS_CA"]):
        assert path in mounted and mounted[path].endswith("/certs/" + path.rsplit("/", 1)[1]), f"{role}: {path} is not mounted from ./certs"
    # the settings are real settings of the role (load_config ignores unknown TANDEM_* names)
    unknown = {k for k in env if k.startswith("TANDEM_") and k[len("TANDEM_") :].lower() not in config_fields(role)}
    assert not unknown, f"{role}: not settings of {role}: {sorted(unknown)}"


def test_no_container_gets_the_ca_key_or_another_roles_key():
    for name, svc in merged()["services"].items():
        keys = {p.rsplit("/", 1)[1] for p in mounts(svc) if p.endswith("-key.pem")}
        allowed = {f"{name}-key.pem", "client-key.pem"}
        assert keys <= allowed, f"{name} mounts {sorted(keys - allowed)}"


def test_services_dial_the_etcd_that_serves_tls_to_the_cas_certificates():
    etcd = merged()["services"]["etcd"]
    command = " ".join(etcd["command"])
    assert "https://etcd:2379" in command and "--client-cert-auth" in command, command
    for flag, path in (("--cert-file", "etcd.pem"), ("--key-file", "etcd-key.pem"), ("--trusted-ca-file", "ca.pem")):
        assert f"{flag}={CERTS_DIR}/{path}" in command and f"{CERTS_DIR}/{path}" in mounts(etcd), flag
    test = etcd["healthcheck"]["test"]
    assert "--endpoints=https://127.0.0.1:2379" in test and all(f"{CERTS_DIR}/{f}" in mounts(etcd) for f in ("client.pem", "client-key.pem"))
    for role in ROLES:
        assert merged()["services"][role]["environment"]["TANDEM_ETCD"] == "https://etcd:2379", role


@pytest.mark.parametrize("role", ROLES)
def test_healthchecks_present_the_client_certificate_and_check_the_role(role):
    svc = merged()["services"][role]
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "tandem", "health"], test
    args = build_parser().parse_args(test[2:])  # what `tandem health` will make of it
    assert args.address == f"127.0.0.1:{DEFAULT_GRPC_PORTS[role]}" and args.role == role and args.tls_dir == CERTS_DIR
    for name in ("ca.pem", "client.pem", "client-key.pem"):  # what check_health reads from --tls-dir
        assert f"{CERTS_DIR}/{name}" in mounts(svc), f"{role}: healthcheck needs {CERTS_DIR}/{name}"


def test_the_documented_certs_command_makes_every_mounted_file(tmp_path):
    """The header's `tandem certs certs` writes each file the override mounts."""
    made = certs.create(tmp_path / "certs")
    override = yaml.safe_load(TLS_FILE.read_text())
    for name, svc in override["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./certs/") and (made / source.removeprefix("./certs/")).is_file(), f"{name}: {source}"
