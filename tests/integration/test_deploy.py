"""deploy/ passes the checks that run without a Docker engine or a Kubernetes cluster:
hadolint on the Dockerfiles, the Compose schema on the compose file, `kubectl kustomize` and
the Kubernetes schemas on every overlay, `systemd-analyze verify` on the units. What these do
not prove (an image that builds, pods that schedule) is listed in docs/deploy.md."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (DEPLOY / "kubernetes" / "overlays").iterdir())


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


def _tool(name: str) -> Path:
    path = BIN / name
    if path.exists():
        return path
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: `make .venv/.test-stamp` installs it")
    return Path(found)


def test_dockerfiles_pass_hadolint() -> None:
    files = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
    assert [f.name for f in files] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    r = _run(_tool("hadolint"), "--no-color", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in files:  # non-root, with a health check
        text = f.read_text()
        assert "USER 10001:10001" in text and "HEALTHCHECK" in text, f


def test_compose_file_matches_the_compose_schema() -> None:
    compose = DEPLOY / "compose.yaml"
    r = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose)
    assert r.returncode == 0, r.stdout + r.stderr
    services = yaml.safe_load(compose.read_text())["services"]
    assert {"postgres", "migrate", "listener", "worker", "orthanc", "triton"} <= set(services)
    assert services["listener"]["command"] == ["listen"]
    assert services["worker"]["command"][0] == "worker"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_overlays_render_and_validate(overlay: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    r = _run(kubectl, "kustomize", DEPLOY / "kubernetes" / "overlays" / overlay)
    assert r.returncode == 0, r.stderr
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(r.stdout)
    v = _run(_tool("kubernetes-validate"), "--strict", "--quiet", rendered)
    assert v.returncode == 0, v.stdout + v.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "cadnode-listener"), ("Deployment", "cadnode-worker"),
            ("Service", "cadnode-dicom"), ("Job", "cadnode-db-upgrade"),
            ("PodDisruptionBudget", "cadnode-worker")} <= kinds
    worker = next(d for d in docs if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "cadnode-worker")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    db_url = next(e for e in container["env"] if e["name"] == "CADNODE_DB_URL")
    assert db_url["valueFrom"]["secretKeyRef"] == {"name": "cadnode-db", "key": "url"}
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    scalers = {k for k, _ in kinds} & {"HorizontalPodAutoscaler", "ScaledObject"}
    assert scalers == ({"ScaledObject"} if overlay == "keda" else {"HorizontalPodAutoscaler"})
    unchecked = [ln for ln in v.stdout.splitlines() if "Couldn't find schema" in ln]
    assert all("keda.sh" in ln for ln in unchecked), unchecked  # only KEDA's CRDs


def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` in a root that holds the install the units expect (the
    virtual environment's cadnode, the settings file) and the system's own units."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd", root / "usr" / "lib" / "systemd", symlinks=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for unit in (DEPLOY / "systemd").glob("*.service"):
        shutil.copy(unit, units)
    exe = root / "opt" / "cadnode" / "venv" / "bin" / "cadnode"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "etc" / "cadnode").mkdir()
    shutil.copy(DEPLOY / "systemd" / "cadnode.env.example", root / "etc" / "cadnode" /
                "cadnode.env")
    r = _run(analyze, "verify", f"--root={root}", "cadnode-db-upgrade.service",
             "cadnode-listen.service", "cadnode-worker@0.service")
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
