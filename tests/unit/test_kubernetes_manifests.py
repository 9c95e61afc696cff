"""deploy/kubernetes: every overlay renders, every object is valid Kubernetes, and the manifests agree
with the code (settings, ports, drain), without a cluster.

Rendering uses `kubectl kustomize` (or `kustomize build`); objects are checked against the OpenAPI
schemas of the oldest and the newest Kubernetes release kubernetes-validate carries, strictly
(unknown fields are errors). The NetworkPolicies have their own file:
test_kubernetes_network_policies.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re

import kubernetes_validate
import pytest
import yaml

from services.common.config import DEFAULT_GRPC_PORTS, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORTS, ROLES, ServiceConfig, load_config
from tests.helpers.kustomize import (
    KUBERNETES_DIR,
    ROOT,
    container_env,
    container_ports,
    find_kustomize,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    render,
    tandem_role,
    workloads,
)  # fmt: skip

pytestmark = pytest.mark.skipif(find_kustomize()[0] is None, reason=find_kustomize()[1])

OVERLAYS = ("dev", "pd", "tls", "external-etcd")
# the oldest Kubernetes release these manifests support (native gRPC probes, matchLabelKeys) and the newest schema bundled
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
DOC = ROOT / "docs" / "deploy-kubernetes.md"


@pytest.fixture(params=OVERLAYS)
def objects(request) -> tuple[dict, ...]:
    return render(KUBERNETES_DIR / "overlays" / request.param)


def tandem_containers(objects):
    """(workload, container, role) for every container that runs `tandem serve ROLE`."""
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            role = tandem_role(container)
            if role is not None:
                yield workload, container, role


TLS_SETTINGS = ("TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA")


def config_of(container: dict, role: str, objects) -> ServiceConfig:
    # TLS files exist in the pod only (a mounted Secret: test_tls_files_come_from_the_roles_secret);
    # load_config checks they are readable, so a readable stand-in takes their place here
    env = {k: (os.devnull if k in TLS_SETTINGS and v else v) for k, v in container_env(container, objects).items()}
    return load_config(role, None, env)


def tls_dir_of(container: dict, objects) -> str | None:
    """The directory TANDEM_TLS_* name (one directory for the three), or None without TLS."""
    env = container_env(container, objects)
    dirs = {os.path.dirname(env[k]) for k in TLS_SETTINGS if env.get(k)}
    assert len(dirs) <= 1, f"TLS files in several directories: {dirs}"
    return dirs.pop() if dirs else None


def projected_files(workload: dict, container: dict, directory: str) -> tuple[str | None, set[str]]:
    """(Secret name, file names) that `directory` of `container` holds from a Secret volume."""
    mount = next((m for m in container.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == directory), None)
    if mount is None:
        return None, set()
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    secret = volume.get("secret") or {}
    return secret.get("secretName"), {item["path"] for item in secret.get("items") or []}


def role_settings(role: str) -> set[str]:
    return {f.name for f in dataclasses.fields(ServiceConfig) if f.name != "role" and role in f.metadata["roles"]}


# ---- rendering and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_kubernetes(objects, version):
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid Kubernetes {version} at {path}: {e.message}")


def test_schema_validation_rejects_an_unknown_field():
    # the strict schemas are what makes a misspelt field fail above
    deployment = dict(named(render(KUBERNETES_DIR / "overlays" / "dev"), "Deployment", "tandem-decode"))
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_model_volume_component_renders_valid_objects(tmp_path):
    # kustomize accepts only relative paths to other kustomizations
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(KUBERNETES_DIR / "overlays" / "dev", tmp_path)],
        "components": [os.path.relpath(KUBERNETES_DIR / "components" / "model-volume", tmp_path)],
        "configMapGenerator": [{"name": "tandem-model", "behavior": "merge", "literals": ["TANDEM_MODEL=/models/Qwen2.5-0.5B-Instruct"]}],
    }))  # fmt: skip
    objects = render(tmp_path)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    claim = named(objects, "PersistentVolumeClaim", "tandem-models")["metadata"]["name"]
    for _, container, role in tandem_containers(objects):
        if role == "gateway":
            continue
        assert config_of(container, role, objects).model == "/models/Qwen2.5-0.5B-Instruct", role
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/models" in mounts, f"{role}: /models is not mounted ({mounts})"
    for workload in workloads(objects):
        claims = [v["persistentVolumeClaim"] for v in pod_spec(workload).get("volumes") or [] if "persistentVolumeClaim" in v]
        if pod_labels(workload).get("app.kubernetes.io/component") in ("tokenizer", "prefill", "decode"):
            assert claims == [{"claimName": claim, "readOnly": True}], workload["metadata"]["name"]


# ---- tandem serve ROLE: command, settings, ports --------------------------------------------------


def test_every_role_runs_from_the_one_image(objects):
    found = {}
    for workload, container, role in tandem_containers(objects):
        assert role in ROLES, f"{workload['metadata']['name']}: `tandem serve {role}` is no role"
        assert pod_labels(workload).get("app.kubernetes.io/component") == role, workload["metadata"]["name"]
        found[role] = container["image"]
    assert set(found) == set(ROLES), f"roles deployed: {sorted(found)}"
    assert len(set(found.values())) == 1, f"one image for every role, got {found}"


def test_environment_names_only_settings_of_the_role(objects):
    # load_config ignores TANDEM_<FIELD> variables that are not settings of the role: a typo, or a
    # worker setting given to the gateway, would silently do nothing
    for workload, container, role in tandem_containers(objects):
        names = {key for key in container_env(container, objects) if key.startswith("TANDEM_")}
        unknown = sorted(n for n in names if n.removeprefix("TANDEM_").lower() not in role_settings(role))
        assert not unknown, f"{workload['metadata']['name']}: {unknown} are not settings of `tandem serve {role}`"


def test_settings_load_and_bind_the_pod(objects):
    for _workload, container, role in tandem_containers(objects):
        config = config_of(container, role, objects)  # raises ValueError naming a bad value
        assert config.host == "0.0.0.0", f"{role}: must bind every interface of the pod, binds {config.host}"
        advertise = next((v for v in container.get("env") or [] if v["name"] == "TANDEM_ADVERTISE_HOST"), None)
        assert advertise and advertise.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", (
            f"{role}: TANDEM_ADVERTISE_HOST must be the pod IP (downward API), got {advertise}"
        )


def test_containers_serve_the_ports_of_their_settings(objects):
    for _workload, container, role in tandem_containers(objects):
        config = config_of(container, role, objects)
        ports = container_ports(container)
        assert ports.get("grpc") == config.port == DEFAULT_GRPC_PORTS[role], f"{role}: ports {ports}, gRPC on {config.port}"
        assert ports.get("metrics") == config.metrics_port == DEFAULT_METRICS_PORTS[role], f"{role}: ports {ports}"
        if role == "gateway":
            assert ports.get("http") == config.http_port == DEFAULT_HTTP_PORT, f"gateway: ports {ports}"


def test_probes_point_at_ports_the_container_serves(objects):
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            ports = container_ports(container)
            where = f"{workload['metadata']['name']}/{container['name']}"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                assert probe, f"{where}: no {kind}"
                action = next(probe[k] for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
                port = action.get("port")
                if "exec" in probe:
                    continue  # checked below: `tandem health` dials the role's gRPC port
                if isinstance(port, str):
                    assert port in ports, f"{where}: {kind} names port {port!r}, the container has {ports}"
                else:
                    assert port in ports.values(), f"{where}: {kind} dials {port}, the container serves {ports}"
            role = tandem_role(container)
            if role and tls_dir_of(container, objects):
                # Kubernetes' gRPC probes cannot speak TLS: `tandem health` with the role's certificate
                from tandem.cli import build_parser

                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    command = container[kind].get("exec", {}).get("command") or []
                    assert command[:2] == ["tandem", "health"], f"{where}: {kind} must exec `tandem health` on a TLS port, got {container[kind]}"
                    args = build_parser().parse_args(command[1:])
                    assert args.address == f"127.0.0.1:{ports['grpc']}" and args.role == role, f"{where}: {kind} {command}"
                    _, files = projected_files(workload, container, args.tls_dir.rstrip("/"))
                    assert {"ca.pem", "client.pem", "client-key.pem"} <= files, f"{where}: {kind}: --tls-dir {args.tls_dir} holds {files}"
                    assert container[kind].get("timeoutSeconds", 1) > args.timeout, f"{where}: {kind} times out before `tandem health` does"
            elif role:
                # grpc.health.v1, on the gRPC port: SERVING only once the model is loaded and registered
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert container[kind].get("grpc", {}).get("port") == ports["grpc"], f"{where}: {kind} must be a native gRPC probe"


def test_tls_files_come_from_the_roles_secret(objects):
    for workload, container, role in tandem_containers(objects):
        directory = tls_dir_of(container, objects)
        if directory is None:
            continue
        secret, files = projected_files(workload, container, directory)
        env = container_env(container, objects)
        assert secret == f"tandem-{role}-tls", f"{role}: {directory} is mounted from {secret!r}, not the role's Secret"
        assert {os.path.basename(env[k]) for k in TLS_SETTINGS} <= files, (
            f"{role}: {directory} holds {files}, the settings name {[env[k] for k in TLS_SETTINGS]}"
        )


def test_startup_probes_wait_for_the_model_load_and_kernel_build(objects):
    for _workload, container, role in tandem_containers(objects):
        probe = container["startupProbe"]
        budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        need = 600 if role in ("prefill", "decode") else 120
        assert budget >= need, f"{role}: the startup probe gives up after {budget}s; allow {need}s"


def test_termination_grace_covers_the_pause_and_the_drain(objects):
    for workload, container, role in tandem_containers(objects):
        drain = config_of(container, role, objects).drain_timeout
        command = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
        assert not command or (command[0] == "sleep" and len(command) == 2), f"{role}: preStop must be a plain pause, got {command}"
        pause = float(command[1]) if command else 0.0
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace >= pause + drain + 5, f"{role}: grace {grace}s < preStop {pause}s + drain {drain}s + 5s to close"
        assert grace <= pause + drain + 30, f"{role}: grace {grace}s holds a dead pod far beyond its drain ({drain}s)"
    gateway = next(c for _, c, role in tandem_containers(objects) if role == "gateway")
    assert "preStop" in gateway.get("lifecycle", {}), "the gateway must keep accepting until its Service drops it"


def test_no_service_links(objects):
    # a Service named `tandem` would inject TANDEM_PORT=tcp://...: read as the --port setting
    for workload in workloads(objects):
        assert pod_spec(workload).get("enableServiceLinks") is False, workload["metadata"]["name"]


def test_env_references_name_earlier_variables(objects):
    # the kubelet expands $(VAR) only from variables defined before; otherwise the text stays literal
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            defined: set[str] = set()
            for var in container.get("env") or []:
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var.get("value", "")):
                    assert ref in defined, f"{workload['metadata']['name']}: {var['name']} uses $({ref}) before it is defined"
                defined.add(var["name"])


def test_files_named_by_settings_are_mounted(objects):
    # TANDEM_API_KEYS=@FILE: the gateway refuses to start when the file is missing
    for _workload, container, role in tandem_containers(objects):
        mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts") or []]
        for key, value in container_env(container, objects).items():
            if key.startswith("TANDEM_") and value.startswith("@"):
                assert any(value[1:].startswith(m) for m in mounts), f"{role}: {key}={value} is on no mounted volume ({mounts})"


def test_referenced_secrets_exist_or_are_documented(objects):
    rendered = {obj["metadata"]["name"] for obj in of_kind(objects, "Secret")}
    doc = DOC.read_text(encoding="utf-8")
    for workload in workloads(objects):
        for volume in pod_spec(workload).get("volumes") or []:
            name = (volume.get("secret") or {}).get("secretName")
            if name and name not in rendered:
                assert f"`{name}`" in doc, f"{workload['metadata']['name']} mounts Secret {name}: generate it or document it in {DOC.name}"


# ---- resources, spreading, labels -----------------------------------------------------------------


def _quantity(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3}
    for suffix, factor in units.items():
        if str(value).endswith(suffix):
            return float(str(value)[: -len(suffix)]) * factor
    return float(value)


def test_every_container_has_requests_and_limits(objects):
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind) or {}), f"{workload['metadata']['name']}: {kind} {resources}"


def test_workers_fit_their_threads_and_kv_cache(objects):
    for _workload, container, role in tandem_containers(objects):
        if role not in ("prefill", "decode"):
            continue
        config, limits = config_of(container, role, objects), container["resources"]["limits"]
        assert config.threads == _quantity(limits["cpu"]), f"{role}: TANDEM_THREADS={config.threads}, CPU limit {limits['cpu']}"
        room = _quantity(limits["memory"]) - config.kv_cache_gb * 2**30
        assert room >= 1.5 * 2**30, f"{role}: memory limit {limits['memory']} leaves {room / 2**30:.2f} GiB beside a {config.kv_cache_gb} GiB KV cache"


def test_decode_pods_spread_over_machines(objects):
    decode = named(objects, "Deployment", "tandem-decode")
    constraints = pod_spec(decode).get("topologySpreadConstraints") or []
    by_host = [c for c in constraints if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_host and by_host[0]["whenUnsatisfiable"] == "DoNotSchedule", constraints
    assert by_host[0]["labelSelector"]["matchLabels"].items() <= pod_labels(decode).items()


def test_selectors_match_the_labels_of_exactly_one_workload(objects):
    def selected(selector: dict) -> list[str]:
        return [w["metadata"]["name"] for w in workloads(objects) if selector.items() <= pod_labels(w).items()]

    for workload in workloads(objects):
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels(workload).items(), workload["metadata"]["name"]
    for service in of_kind(objects, "Service"):
        targets = selected(service["spec"]["selector"])
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {targets}"
        target = named(objects, next(w["kind"] for w in workloads(objects) if w["metadata"]["name"] == targets[0]), targets[0])
        ports = {name: number for c in pod_spec(target)["containers"] for name, number in container_ports(c).items()}
        for port in service["spec"]["ports"]:
            want = port.get("targetPort", port["port"])
            assert want in ports or want in ports.values(), f"Service {service['metadata']['name']}: targetPort {want} not in {ports}"
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1, f"PodDisruptionBudget {pdb['metadata']['name']}"
    for role in ROLES:
        budgets = [p for p in of_kind(objects, "PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == role]
        assert budgets, f"no PodDisruptionBudget for the {role} pods"
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = named(objects, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], f"{target['metadata']['name']} is autoscaled: leave spec.replicas to the HPA"


def test_prometheus_annotations_name_the_metrics_port(objects):
    for workload in workloads(objects):
        annotations = workload["spec"]["template"]["metadata"].get("annotations") or {}
        assert annotations.get("prometheus.io/scrape") == "true", workload["metadata"]["name"]
        served = {n for c in pod_spec(workload)["containers"] for n in container_ports(c).values()}
        assert int(annotations["prometheus.io/port"]) in served, f"{workload['metadata']['name']}: {annotations}"
    for workload, _container, role in tandem_containers(objects):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == DEFAULT_METRICS_PORTS[role], role


def test_autoscalers_use_the_metric_the_adapter_serves():
    values = yaml.safe_load((KUBERNETES_DIR / "extras" / "prometheus-adapter-values.yaml").read_text(encoding="utf-8"))
    served = {rule["name"]["as"]: re.match(r"[\w:]+", rule["seriesQuery"]).group(0) for rule in values["rules"]["custom"]}
    metrics_source = (ROOT / "services" / "common" / "metrics.py").read_text(encoding="utf-8")
    hpas = of_kind(render(KUBERNETES_DIR / "overlays" / "pd"), "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {"tandem-prefill", "tandem-decode"}
    for hpa in hpas:
        for metric in hpa["spec"]["metrics"]:
            name = metric["pods"]["metric"]["name"]
            assert name in served, f"HPA {hpa['metadata']['name']} scales on {name}; the adapter serves {sorted(served)}"
            assert f'"{served[name]}"' in metrics_source, f"the workers export no metric {served[name]}"


# ---- etcd ---------------------------------------------------------------------------------------


def test_services_dial_the_etcd_the_overlay_runs(objects):
    statefulsets = [s for s in of_kind(objects, "StatefulSet") if pod_labels(s).get("app.kubernetes.io/component") == "etcd"]
    for _, container, role in tandem_containers(objects):
        endpoint = config_of(container, role, objects).etcd
        host, _, port = endpoint.removeprefix("https://").rpartition(":")
        if statefulsets:  # https: etcd serves TLS to certificates of the CA; plaintext: it does not
            env = {v["name"]: v.get("value", "") for v in pod_spec(statefulsets[0])["containers"][0]["env"]}
            tls = endpoint.startswith("https://")
            assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://" if tls else "http://"), (
                f"{role} dials {endpoint}, etcd listens on {env['ETCD_LISTEN_CLIENT_URLS']}"
            )
            assert (env.get("ETCD_CLIENT_CERT_AUTH") == "true") == tls and (not tls or tls_dir_of(container, objects)), (
                f"{role}: {endpoint} without a client certificate"
            )
        if not statefulsets:  # external etcd: the NetworkPolicy must let the pods reach that address
            egress = named(objects, "NetworkPolicy", "tandem-etcd-client")["spec"]["egress"]
            blocks = [ipaddress.ip_network(peer["ipBlock"]["cidr"]) for rule in egress for peer in rule.get("to", []) if "ipBlock" in peer]
            assert any(ipaddress.ip_address(host) in block for block in blocks), f"{role}: TANDEM_ETCD {host} is outside {blocks}"
        else:
            service = named(objects, "Service", host)
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}, f"{role}: TANDEM_ETCD port {port}"
            assert service["spec"]["selector"].items() <= pod_labels(statefulsets[0]).items(), f"{role}: {host} is not etcd"


def test_etcd_members_agree_with_replicas():
    for overlay in ("dev", "pd", "tls"):
        statefulset = named(render(KUBERNETES_DIR / "overlays" / overlay), "StatefulSet", "tandem-etcd")
        env = {v["name"]: v.get("value") for v in pod_spec(statefulset)["containers"][0]["env"]}
        members = dict(m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(","))
        want = [f"tandem-etcd-{i}" for i in range(statefulset["spec"]["replicas"])]
        assert sorted(members) == want, f"{overlay}: ETCD_INITIAL_CLUSTER members {sorted(members)}, pods {want}"
        scheme = env["ETCD_INITIAL_ADVERTISE_PEER_URLS"].split(":")[0]
        for name, url in members.items():
            assert url == f"{scheme}://{name}.{statefulset['spec']['serviceName']}.$(POD_NAMESPACE).svc:2380", f"{overlay}: {url}"
        assert env["ETCD_LISTEN_PEER_URLS"].startswith(scheme + "://"), overlay
