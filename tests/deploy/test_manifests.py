"""The deployment files say what docs/deploy.md and the Knative runtime contract require.

No cluster and no Docker daemon: the YAML is parsed and its fields checked, and the Dockerfile
is checked as text.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cicada_async.service.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
KNATIVE = ROOT / "deploy" / "knative" / "service.yaml"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
QUEUE_PROXY_DRAIN_S = 30.0


def docs(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def seconds(s: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m|h)", s)
    assert m, s
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def knative() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    d = docs(KNATIVE)
    tmpl = d["Service"]["spec"]["template"]
    return d, tmpl["metadata"]["annotations"], tmpl["spec"]


def kserve() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    d = docs(KSERVE)
    isvc = d["InferenceService"]
    return d, isvc["metadata"]["annotations"], isvc["spec"]["predictor"]


BOTH = pytest.mark.parametrize("load", [knative, kserve], ids=["knative", "kserve"])


def test_knative_service_autoscaling() -> None:
    d, ann, spec = knative()
    assert d["Service"]["apiVersion"] == "serving.knative.dev/v1"
    # Above 1: queued requests reach the priority heap instead of queue-proxy's FIFO.
    assert spec["containerConcurrency"] > 1
    assert ann["autoscaling.knative.dev/min-scale"] == "0"
    assert int(ann["autoscaling.knative.dev/target"]) >= 1
    assert int(ann["autoscaling.knative.dev/target"]) <= spec["containerConcurrency"]
    assert seconds(ann["autoscaling.knative.dev/scale-to-zero-pod-retention-period"]) > 0
    assert seconds(ann["autoscaling.knative.dev/window"]) >= 6
    assert seconds(ann["serving.knative.dev/progress-deadline"]) > 0
    assert 0 < spec["timeoutSeconds"] <= 600


def test_kserve_predictor_autoscaling() -> None:
    d, ann, pred = kserve()
    assert d["InferenceService"]["apiVersion"] == "serving.kserve.io/v1beta1"
    assert pred["containerConcurrency"] > 1
    assert pred["minReplicas"] == 0
    assert pred["maxReplicas"] >= 1
    assert pred["scaleMetric"] == "concurrency"
    assert 1 <= pred["scaleTarget"] <= pred["containerConcurrency"]
    assert 0 < pred["timeout"] <= 600
    assert seconds(ann["serving.knative.dev/progress-deadline"]) > 0
    assert seconds(ann["autoscaling.knative.dev/scale-to-zero-pod-retention-period"]) > 0
    # No storageUri: the storage-initializer would download the whole model before start.
    assert "storageUri" not in pred and "model" not in pred
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container"


@BOTH
def test_container_port_probes_and_security(load) -> None:  # type: ignore[no-untyped-def]
    _, _, spec = load()
    (c,) = spec["containers"]  # Knative: exactly one serving container
    (port,) = c["ports"]
    assert port["containerPort"] == 8080 and port.get("protocol", "TCP") == "TCP"
    assert port.get("name", "http1") == "http1"  # HTTP/1.1 REST; h2c would be gRPC
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        # Any initial delay adds straight to every cold start.
        assert probe.get("initialDelaySeconds", 0) == 0, kind
        # Knative probes the serving port itself and refuses another one.
        assert "port" not in probe["httpGet"], kind
    # Unset readiness period: queue-proxy then probes every few ms until ready.
    assert c["readinessProbe"].get("periodSeconds", 0) == 0
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False


@BOTH
def test_s3_credentials_from_a_secret(load) -> None:  # type: ignore[no-untyped-def]
    d, _, spec = load()
    (c,) = spec["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    secret = d["Secret"]["metadata"]["name"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": key}
        assert "value" not in env[key]
        assert key in d["Secret"]["stringData"]
    # No secret in the ConfigMap.
    assert "aws_secret_access_key" not in d["ConfigMap"]["data"]["cicada.toml"]


@BOTH
def test_config_from_a_mounted_configmap(load) -> None:  # type: ignore[no-untyped-def]
    d, _, spec = load()
    (c,) = spec["containers"]
    cm = d["ConfigMap"]
    vol = next(v for v in spec["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
    args = c["args"]
    cfg_path = args[args.index("--config") + 1]
    assert cfg_path == f"{mount['mountPath']}/cicada.toml"
    # The config is valid for the server, leaves the port to $PORT and listens on 0.0.0.0.
    config = parse_config(tomllib.loads(cm["data"]["cicada.toml"]))
    assert config.server.port is None and config.server.host == "0.0.0.0"
    assert all(m.uri.startswith("s3://") for m in config.models.values()) and config.models
    assert "s3" in config.storage
    # Drain budget: queue-proxy drains ~30 s, then SIGTERM; our drain must end before SIGKILL.
    grace = spec.get("timeoutSeconds") or spec.get("timeout")  # the pod grace period
    assert config.server.shutdown_timeout_s < grace - QUEUE_PROXY_DRAIN_S
    # readOnlyRootFilesystem needs a writable /tmp (HF_HOME points there).
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


# -- Dockerfile -----------------------------------------------------------------------------------
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_non_root_with_entrypoint() -> None:
    ins = instructions(dockerfile())
    users = [rest for word, rest in ins if word == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric UID.
    assert user.isdigit() and int(user) != 0
    assert ("ENTRYPOINT", '["cicada", "serve"]') in ins
    assert ("EXPOSE", "8080") in ins
    cmd = next(rest for word, rest in ins if word == "CMD")
    assert '"--config"' in cmd and "/etc/cicada/cicada.toml" in cmd
    assert not any(word == "HEALTHCHECK" for word, _ in ins)
    assert not any(word == "ENV" and re.search(r"\bPORT=(?!8080\b)", rest) for word, rest in ins)


def test_dockerfile_variants() -> None:
    text = dockerfile()
    ins = instructions(text)
    assert ("ARG", "VARIANT=cpu") in ins
    froms = [rest for word, rest in ins if word == "FROM"]
    assert any(f.endswith("AS base-cpu") for f in froms) and any(f.endswith("AS base-cuda") for f in froms)
    assert any(f.startswith("base-${VARIANT}") for f in froms)
    assert re.search(r'torch==\$\{TORCH_VERSION\}".*--index-url https://download.pytorch.org/whl/cpu', text)
    assert ("ARG", "TORCH_VERSION=2.13.0") in ins
    # Every file the image copies exists, and .dockerignore keeps the heavy folders out.
    for word, rest in ins:
        if word == "COPY":
            src = [a for a in rest.split() if not a.startswith("--")][0]
            assert (ROOT / src).exists(), src
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "models", "bench-results"} <= ignored


def test_baked_in_config_is_valid() -> None:
    config = parse_config(tomllib.loads((ROOT / "deploy" / "cicada.toml").read_text()))
    assert config.server.port is None and config.server.host == "0.0.0.0"
