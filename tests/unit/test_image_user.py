"""The image's runtime user is the uid/gid the Kubernetes manifests run Tandem's pods as.

A pod with runAsUser 1000 on an image whose user got whatever uid useradd picked runs as a user
that owns nothing in the image (the kernel cache is chowned to the image's user): the first
kernel build fails with a permission error. And the kubelet can only verify runAsNonRoot for a
numeric USER.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.unit.test_deployment import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"


def image_user() -> tuple[int, int]:
    """(uid, gid) of the Dockerfile's last USER, which must be numeric."""
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "the Dockerfile must set a non-root USER"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER must be numeric uid:gid (the kubelet verifies runAsNonRoot only then), got {users[-1]!r}"
    return int(match[1]), int(match[2])


def tandem_pod_specs() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (((doc or {}).get("spec") or {}).get("template") or {}).get("spec") if isinstance(doc, dict) else None
            if spec and any(str(c.get("image", "")).startswith("tandem") for c in spec.get("containers", [])):
                found.append((f"{path.relative_to(ROOT)} {doc['metadata']['name']}", spec))
    return found


def test_the_image_user_has_the_fixed_uid_and_gid():
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    creates = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "useradd" in args)
    assert f"--uid {uid}" in creates and f"--gid {gid}" in creates, f"useradd must create the user with uid {uid}, gid {gid}: {creates}"


def test_manifests_run_tandem_pods_as_the_image_user():
    uid, gid = image_user()
    specs = tandem_pod_specs()
    assert {name.split()[-1] for name, _ in specs} >= {f"tandem-{role}" for role in ("gateway", "tokenizer", "prefill", "decode")}, [n for n, _ in specs]
    for name, spec in specs:
        pod = spec.get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert (pod.get("runAsUser"), pod.get("runAsGroup"), pod.get("fsGroup")) == (uid, gid, gid), f"{name}: {pod}"
        for container in spec["containers"]:  # a container-level override must agree too
            ctx = container.get("securityContext") or {}
            assert ctx.get("runAsUser", uid) == uid and ctx.get("runAsGroup", gid) == gid, f"{name}/{container['name']}: {ctx}"
