"""Kubernetes (kustomize) manifests, Dockerfiles and the compose file, checked offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}  # not in the Kubernetes schemas: checked by structure below


def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is installed by scripts/setup.sh"
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def test_kustomize_renders_and_every_manifest_validates_against_the_schemas():
    import kubernetes_validate

    docs = rendered()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                                         "ServiceMonitor", "ScaledObject"}
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert all(d["metadata"].get("namespace") == "aim-serve" for d in docs if d["kind"] != "Namespace")


def test_deployment_serves_grpc_on_a_gpu_with_native_probes():
    docs = rendered()
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(m["mountPath"] == "/models" and m["readOnly"] for m in container["volumeMounts"])
    from service.settings import Settings

    assert pod["terminationGracePeriodSeconds"] > Settings().drain_seconds  # room for the drain on SIGTERM


def test_service_is_headless_for_client_side_balancing_and_monitors_point_at_it():
    docs = rendered()
    service = by_kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"] for p in service["spec"]["ports"]}
    monitor = by_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    pdb = by_kind(docs, "PodDisruptionBudget")
    pod_labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


def test_autoscaler_targets_the_deployment_on_metrics_that_exist():
    docs = rendered()
    scaled = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind(docs, "Deployment")["metadata"]["name"]
    rules = (DEPLOY / "prometheus/aim-rules.yml").read_text()
    metrics = (ROOT / "service/metrics.py").read_text()
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) > 0
        for name in re.findall(r"(aim[:_][a-z_:]+)\{", meta["query"]):
            assert f"record: {name}" in rules or f'"{name}"' in metrics, name


def test_dockerfiles_run_non_root_with_a_grpc_healthcheck_and_no_baked_model():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
        assert lines[0].startswith("FROM ") and ":" in lines[0], "base image pinned by tag"
        users = [l for l in lines if l.startswith("USER ")]
        assert users and users[-1] != "USER root"
        assert any(l.startswith("HEALTHCHECK") for l in lines) and "aim-serve\", \"health" in text
        assert not any(l.startswith(("COPY", "ADD")) and "models" in l for l in lines)
        assert 'VOLUME ["/models"]' in text and "STOPSIGNAL SIGTERM" in text
        for copied in re.findall(r"^COPY (\S+)", text, flags=re.M):
            assert (ROOT / copied).exists(), copied
        entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["aim-serve"]
        assert re.search(rf"^COPY {entry.split('.')[0]} ", text, flags=re.M), "the aim-serve command's package"
        # the server install: the server extra only, and neither the reference model's build nor the evaluation
        installs = [l for l in lines if "pip install" in l and "torch==" not in l]
        assert installs and all('pip install ".[server]"' in l for l in installs), installs
        assert not re.search(r"^COPY (reference_model|evaluation)\b", text, flags=re.M)


def test_compose_mounts_the_model_and_provisions_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"aim-serve", "prometheus", "grafana"}
    assert (DEPLOY / services["aim-serve"]["build"]["dockerfile"].replace("deploy/", "")).exists()
    assert any(v.endswith(":/models:ro") for v in services["aim-serve"]["volumes"])
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    assert "aim-serve:9464" in (DEPLOY / "prometheus/prometheus.yml").read_text()
    assert "prometheus:9090" in (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
