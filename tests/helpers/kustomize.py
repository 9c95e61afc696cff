"""Renders deploy/kubernetes with kustomize (`kubectl kustomize`, or a standalone `kustomize build`)
and looks things up in the result, for the manifest tests; no cluster is involved.

    objects = render(KUBERNETES_DIR / "overlays" / "dev")
    for workload in workloads(objects): containers(workload) ...
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


# `labels:` with includeTemplates needs kustomize v5, which kubectl embeds since 1.27 (Debian
# bookworm's kubernetes-client is kubectl 1.20 with kustomize v2.0.3: it cannot render these)
MIN_KUSTOMIZE_MAJOR = 5


def _major(version: str) -> int:
    match = re.search(r"v?(\d+)\.", version or "")
    return int(match.group(1)) if match else 0


@functools.cache
def find_kustomize() -> tuple[list[str] | None, str]:
    """(the command that renders a kustomization directory given as its last argument, "") or
    (None, why not)."""
    found = []
    if shutil.which("kubectl"):
        result = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
        version = json.loads(result.stdout or "{}").get("kustomizeVersion", "") if result.returncode == 0 else ""
        if _major(version) >= MIN_KUSTOMIZE_MAJOR:
            return ["kubectl", "kustomize"], ""
        found.append(f"kubectl embeds kustomize {version or 'older than v5'}")
    if shutil.which("kustomize"):
        result = subprocess.run(["kustomize", "version"], capture_output=True, text=True, timeout=60)
        if _major(result.stdout) >= MIN_KUSTOMIZE_MAJOR:
            return ["kustomize", "build"], ""
        found.append(f"kustomize is {result.stdout.strip() or 'unknown'}")
    if not found:
        return None, "neither kubectl (with kustomize) nor kustomize is installed: cannot render deploy/kubernetes"
    return None, "; ".join(found) + f": deploy/kubernetes needs kustomize v{MIN_KUSTOMIZE_MAJOR}+ (kubectl 1.27+)"


def kustomize_command() -> list[str] | None:
    return find_kustomize()[0]


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    """Every object the kustomization in `directory` renders to. Raises AssertionError with
    kustomize's message when it fails."""
    command = kustomize_command()
    assert command is not None, "neither kubectl nor kustomize is installed"
    # kubectl may want a writable HOME for its cache; the test must not depend on the user's
    env = {**os.environ, "HOME": os.environ.get("HOME") or "/tmp"}
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def of_kind(objects, kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects, kind: str, name: str) -> dict:
    found = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert found, f"no {kind} {name!r}; there are {[o['metadata']['name'] for o in of_kind(objects, kind)]}"
    return found[0]


def workloads(objects) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels") or {}


def container_ports(container: dict) -> dict[str, int]:
    """{port name: number} of a container; unnamed ports under their number as a string."""
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports") or []}


def tandem_role(container: dict) -> str | None:
    """ROLE when the container runs `tandem serve ROLE` (the image's entrypoint is `tandem`), else None."""
    args = container.get("args") or []
    if container.get("command") is None and args[:1] == ["serve"] and len(args) >= 2:
        return args[1]
    return None


def container_env(container: dict, objects) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps and Secrets, then
    env (later wins). fieldRef values become placeholders (status.podIP → 10.0.0.1)."""
    placeholders = {"status.podIP": "10.0.0.1", "metadata.name": "pod-0", "metadata.namespace": "ns"}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(named(objects, "ConfigMap", source["configMapRef"]["name"]).get("data") or {})
        else:
            raise NotImplementedError(f"envFrom {source}")
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = placeholders[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise NotImplementedError(f"env {var}")
    return env
