"""The Kubernetes manifests (deploy/kubernetes/): every overlay renders with ``kubectl kustomize``, every
object is valid for Kubernetes 1.32 (the kubectl here) and the registry in its ConfigMap is one coe accepts.

No cluster runs here, so validity is checked offline and strictly (unknown fields are errors):
built-in kinds against ``kubernetes-validate``'s bundled 1.32 schemas; the ServiceMonitor, a custom
resource, against the CRD committed in ``deploy/kubernetes/crds/`` (its source is noted there).
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
TARGETS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
K8S_VERSION = "1.32.0"
"""The version of the kubectl on these machines (shared/ENVIRONMENT.md)."""
CRDS = {"monitoring.coreos.com/v1/ServiceMonitor": KUBE / "crds" / "monitoring.coreos.com_servicemonitors.yaml"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize)")


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize`` builds from ``deploy/kubernetes/TARGET``."""
    out = subprocess.run(["kubectl", "kustomize", str(KUBE / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(objs: tuple[dict[str, Any], ...], kind: str, name_prefix: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} {name_prefix}*, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema with unknown fields refused, as ``kubectl apply --validate=strict`` does:
    every object that lists its properties and says nothing of others gets ``additionalProperties: false``."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(crd_file: Path, version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(crd_file.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_schema(served["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(target: str) -> None:
    objs = render(target)
    assert objs, f"{target} rendered nothing"
    custom = 0
    for obj in objs:
        gvk = f"{obj['apiVersion']}/{obj['kind']}"
        where = f"{target}: {obj['kind']} {obj['metadata']['name']}"
        if gvk in CRDS:
            group_version = obj["apiVersion"].split("/")[1]
            errors = sorted(crd_validator(CRDS[gvk], group_version).iter_errors(obj), key=str)
            assert not errors, f"{where}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
            custom += 1
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
    if target == "overlays/prometheus-operator":
        assert custom == 1, "the ServiceMonitor was not checked against its CRD"


@pytest.mark.parametrize("target", TARGETS)
def test_experts_configmap_passes_coe_validate(target: str, tmp_path: Path) -> None:
    """The registry the pods mount is one ``coe experts validate`` accepts (the command users run)."""
    config_map = find(render(target), "ConfigMap", "coe-experts-")
    path = tmp_path / "experts.yaml"
    path.write_text(config_map["data"]["experts.yaml"])
    out = subprocess.run([sys.executable, "-m", "services.cli", "experts", "validate", "--config", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"{target}: coe experts validate failed:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_mount_what_exists_and_probe_health(target: str) -> None:
    """References the schemas cannot see: the API pods probe /health/* on a declared port, every
    ConfigMap/Secret a pod reads is rendered with it (the ConfigMap's hashed name included), the Service,
    PDB and HPA select the API pods, and the worker runs ``coe worker`` on the same registry."""
    objs = render(target)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    api = find(objs, "Deployment", "coe-api")
    pod = api["spec"]["template"]
    (coe,) = [c for c in pod["spec"]["containers"] if c["name"] == "coe"]
    assert coe["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert coe["livenessProbe"]["httpGet"]["path"] == "/health/live"
    ports = {p["name"] for p in coe["ports"]}
    assert coe["readinessProbe"]["httpGet"]["port"] in ports and coe["resources"]["requests"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        obj = find(objs, kind, "coe-api")
        selector = obj["spec"]["selector"].get("matchLabels", obj["spec"]["selector"])
        assert selector.items() <= labels.items(), f"{kind} coe-api does not select the API pods"
    assert find(objs, "HorizontalPodAutoscaler", "coe-api")["spec"]["scaleTargetRef"]["name"] == "coe-api"
    worker = find(objs, "Deployment", "coe-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"][:1] == ["worker"]
    for deployment in (api, worker):
        spec = deployment["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, f"missing ConfigMap of {volume}"
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for source in container.get("envFrom", []):
                secret = source["secretRef"]["name"]
                if secret == "coe-keys":  # vllm-keys is the user's own (overlays/remote-vllm says so)
                    assert ("Secret", secret) in names
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_with_redis_runs_redis_with_aof_and_points_coe_at_it() -> None:
    objs = render("overlays/with-redis")
    redis = find(objs, "StatefulSet", "coe-redis")
    conf = find(objs, "ConfigMap", "coe-redis")["data"]["redis.conf"]
    assert "appendonly yes" in conf.splitlines()
    assert redis["spec"]["volumeClaimTemplates"], "AOF needs a persistent volume"
    url = find(objs, "Secret", "coe-keys")["stringData"]["COE_REDIS_URL"]
    service = find(objs, "Service", "coe-redis")
    assert url.startswith(f"redis://{redis['metadata']['name']}-0.{service['metadata']['name']}:6379")
    assert service["spec"]["clusterIP"] == "None" and redis["spec"]["serviceName"] == service["metadata"]["name"]


def test_crd_schema_refuses_unknown_fields() -> None:
    """The strict CRD check can fail: a misspelt ServiceMonitor field is an error, not silently pruned."""
    monitor = copy.deepcopy(find(render("overlays/prometheus-operator"), "ServiceMonitor", "coe-api"))
    validator = crd_validator(CRDS["monitoring.coreos.com/v1/ServiceMonitor"], "v1")
    assert not list(validator.iter_errors(monitor))
    monitor["spec"]["endpoints"][0]["scrapeIntervall"] = "30s"
    assert [e.message for e in validator.iter_errors(monitor)]
