"""deploy/: the Kubernetes manifests validate against the pinned Kubernetes schemas (strict) and lint clean,
and they agree with the service (flags that exist, probes on the V2 health routes, a grace period that
covers the drain)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stablesynth.cloud.commands import register
from stablesynth_device.wire.auth import TOKEN_ENV

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: The Kubernetes release whose schemas the manifests are validated against.
KUBERNETES_VERSION = "1.31.0"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
INFERENCE_SERVICE = DEPLOY / "kserve" / "inferenceservice.yaml"


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for p in MANIFESTS for d in _load(p)}


def test_manifests_validate_strictly_against_the_pinned_schemas() -> None:
    kinds = set()
    for path in MANIFESTS:
        for doc in _load(path):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_the_inference_service_validates_as_far_as_schemas_exist() -> None:
    """kubernetes-validate has no schema for a custom resource (it warns and passes the file): the predictor's
    pod part (containers, volumes, grace period) is a core PodSpec, and is validated as one."""
    (isvc,) = _load(INFERENCE_SERVICE)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(isvc, KUBERNETES_VERSION, strict=True)
    predictor = isvc["spec"]["predictor"]
    pod_fields = ("containers", "volumes", "terminationGracePeriodSeconds")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]},
           "spec": {k: predictor[k] for k in pod_fields}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    assert set(predictor) - set(pod_fields) <= {"minReplicas", "maxReplicas"}
    assert predictor["containers"][0]["name"] == "kserve-container"


def _serve_args(container: dict[str, Any], here: Path) -> argparse.Namespace:
    """The container's `serve` flags parsed by the real parser; the checkpoint folders (inside the pod's
    volume, absent here) are parsed as a local folder and given back as written."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    argv = list(container["args"])
    written = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--checkpoint"]
    argv = [str(here) if i > 0 and argv[i - 1] == "--checkpoint" else a for i, a in enumerate(argv)]
    args = parser.parse_args(argv)
    args.checkpoint = [Path(w) for w in written]
    return args


@pytest.mark.parametrize("which", ["deployment", "inferenceservice"])
def test_pods_drain_within_their_grace_period_and_probe_the_v2_routes(which: str, tmp_path: Path) -> None:
    if which == "deployment":
        pod = _by_kind()["Deployment"]["spec"]["template"]["spec"]
    else:
        pod = _load(INFERENCE_SERVICE)[0]["spec"]["predictor"]
    (container,) = pod["containers"]
    args = _serve_args(container, tmp_path)  # every flag exists and every value is valid
    assert args.command == "serve" and args.drain_timeout > 0
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The preStop sleep, the drain, then uvicorn's wait for the last requests (as long as the drain).
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 2 * args.drain_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    token = {e["name"]: e for e in container["env"]}[TOKEN_ENV]
    assert "secretKeyRef" in token["valueFrom"] and args.token is None and args.token_file is None
    mount = {m["name"]: m for m in container["volumeMounts"]}["checkpoints"]
    assert mount["readOnly"] and str(args.checkpoint[0]).startswith(mount["mountPath"] + "/")
    assert "cpu" in container["resources"]["requests"] and "memory" in container["resources"]["requests"]
    port = container["ports"][0]["containerPort"]
    assert args.port == port and args.host == "0.0.0.0"


def test_service_budget_and_autoscaler_select_the_deployment() -> None:
    k = _by_kind()
    labels = k["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert k["Service"]["spec"]["selector"].items() <= labels.items()
    assert k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = k["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k["Deployment"]["metadata"]["name"])


def test_yamllint_is_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"),
                          str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
