"""deploy/ manifests, validated offline (no cluster): built-in kinds against Kubernetes' own
schemas (kubernetes-validate, strict: an unknown field fails), custom resources field by field
against allow-lists written from KServe's and Kubeflow Trainer's API types, with the Kubernetes
objects they embed (containers, volumes, pod templates) validated against Kubernetes' schemas;
and the settings the fleet depends on checked across files (probes, non-root user, secrets)."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from forseti.server.cli import serve_parser
from forseti.trainer_sidecar.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# The Kubernetes release the manifests target (gRPC probes are GA from 1.27).
KUBERNETES = "1.33.0"
UID = 10001  # docker/*.Dockerfile's USER; every manifest runs as it
GRPC_PORT = 8001

BUILT_IN_GROUPS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2", "batch/v1"}

# Field paths each custom kind may use: "a.b" is a field, "[]" an item of a list. A path
# mapped to a Kubernetes kind (CORE) is validated against Kubernetes' schema instead of being
# walked; a path in MAPS is a string map (labels, annotations) whose keys are free.
#
# KServe, pkg/apis/serving/v1alpha1/servingruntime_types.go: ServingRuntimeSpec
# (supportedModelFormats{name,version,autoSelect,priority}, multiModel, disabled,
# protocolVersions, storageHelper{disabled}) with ServingRuntimePodSpec inline (containers,
# volumes, nodeSelector, affinity, tolerations, labels, annotations, imagePullSecrets).
# pkg/apis/serving/v1beta1/predictor.go, predictor_model.go, component.go: PredictorSpec
# {model: ModelSpec{modelFormat{name,version}, runtime, storageUri, protocolVersion,
# runtimeVersion, corev1.Container inline}, PodSpec inline, ComponentExtensionSpec inline
# (minReplicas, maxReplicas, scaleTarget, scaleMetric, ...)}.
# Kubeflow Trainer, pkg/apis/trainer/v1alpha1/trainingruntime_types.go: TrainingRuntimeSpec
# {mlPolicy{numNodes, torch, mpi}, podGroupPolicy, template: JobSetTemplateSpec{metadata,
# spec: JobSet v1alpha2 JobSetSpec{replicatedJobs[]{name, replicas, template: JobTemplateSpec}}}};
# trainjob_types.go: TrainJobSpec{runtimeRef{name, apiGroup, kind}, trainer{image, command,
# args, env, numNodes, resourcesPerNode, numProcPerNode}, suspend, managedBy}.
METADATA = {"metadata.name", "metadata.namespace"}
MAPS = {"metadata.labels", "metadata.annotations"}
CUSTOM: dict[tuple[str, str], set[str]] = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): METADATA
    | {
        "spec.supportedModelFormats[].name",
        "spec.supportedModelFormats[].version",
        "spec.supportedModelFormats[].autoSelect",
        "spec.supportedModelFormats[].priority",
        "spec.protocolVersions[]",
        "spec.multiModel",
        "spec.disabled",
        "spec.storageHelper.disabled",
        "spec.containers[]",
        "spec.volumes[]",
    },
    ("serving.kserve.io/v1beta1", "InferenceService"): METADATA
    | {
        "spec.predictor.minReplicas",
        "spec.predictor.maxReplicas",
        "spec.predictor.scaleMetric",
        "spec.predictor.scaleTarget",
        "spec.predictor.serviceAccountName",
        "spec.predictor.securityContext",
        "spec.predictor.model.modelFormat.name",
        "spec.predictor.model.modelFormat.version",
        "spec.predictor.model.runtime",
        "spec.predictor.model.storageUri",
        "spec.predictor.model.protocolVersion",
        "spec.predictor.model.args[]",
        "spec.predictor.model.env[]",
        "spec.predictor.model.resources",
    },
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): METADATA
    | {
        "spec.mlPolicy.numNodes",
        "spec.template.spec.replicatedJobs[].name",
        "spec.template.spec.replicatedJobs[].replicas",
        "spec.template.spec.replicatedJobs[].template",
    },
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): METADATA
    | {
        "spec.runtimeRef.name",
        "spec.runtimeRef.apiGroup",
        "spec.runtimeRef.kind",
        "spec.trainer.image",
        "spec.trainer.command[]",
        "spec.trainer.args[]",
        "spec.trainer.env[]",
        "spec.trainer.numNodes",
        "spec.trainer.resourcesPerNode",
        "spec.suspend",
    },
}

# Embedded Kubernetes objects, by path: how to wrap one into an object Kubernetes' schema can
# validate on its own.
_DUMMY = {"name": "wrapped", "image": "wrapped"}


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "wrapped"}, "spec": spec}


CORE: dict[str, Any] = {
    "spec.containers[]": lambda c: _pod({"containers": [c]}),
    "spec.volumes[]": lambda v: _pod({"containers": [_DUMMY], "volumes": [v]}),
    "spec.predictor.securityContext": lambda s: _pod(
        {"containers": [_DUMMY], "securityContext": s}
    ),
    "spec.predictor.model.env[]": lambda e: _pod({"containers": [{**_DUMMY, "env": [e]}]}),
    "spec.predictor.model.resources": lambda r: _pod({"containers": [{**_DUMMY, "resources": r}]}),
    "spec.template.spec.replicatedJobs[].template": lambda t: {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "wrapped", **t.get("metadata", {})},
        "spec": t["spec"],
    },
    "spec.trainer.env[]": lambda e: _pod({"containers": [{**_DUMMY, "env": [e]}]}),
    "spec.trainer.resourcesPerNode": lambda r: _pod({"containers": [{**_DUMMY, "resources": r}]}),
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


DOCUMENTS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] == kind]


def by_name(kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in by_kind(kind) if doc["metadata"]["name"] == name)


def field_paths(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf, stopping at CORE and MAPS paths."""
    if path in CORE or path in MAPS:
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from field_paths(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for item in value:
            yield from field_paths(item, f"{path}[]")
    else:
        yield path, value


def test_the_manifests_cover_what_a_fleet_needs() -> None:
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ClusterServingRuntime",
        "InferenceService",
        "ClusterTrainingRuntime",
        "TrainJob",
        "Pod",
    } <= kinds
    assert any(s["spec"].get("clusterIP") == "None" for s in by_kind("Service"))


@pytest.mark.parametrize(
    "name", [n for n, d in DOCUMENTS if d["apiVersion"] in BUILT_IN_GROUPS], ids=str
)
def test_built_in_kinds_are_valid_for_kubernetes(name: str) -> None:
    doc = dict(DOCUMENTS)[name]
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize(
    "name", [n for n, d in DOCUMENTS if d["apiVersion"] not in BUILT_IN_GROUPS], ids=str
)
def test_custom_resources_use_only_fields_of_their_api(name: str) -> None:
    doc = dict(DOCUMENTS)[name]
    allowed = CUSTOM.get((doc["apiVersion"], doc["kind"]))
    assert allowed is not None, f"no allow-list for {doc['apiVersion']} {doc['kind']}"
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
    unknown = sorted({p for p, _ in field_paths(body) if p not in allowed | MAPS})
    assert unknown == [], f"{name}: fields not in the API reference: {unknown}"
    for path, value in field_paths(body):
        if path in CORE:
            kubernetes_validate.validate(CORE[path](value), KUBERNETES, strict=True)


def test_the_allow_list_check_catches_a_misspelt_field() -> None:
    doc = {"metadata": {"name": "x"}, "spec": {"trainer": {"imagee": "x"}}}
    paths = {p for p, _ in field_paths(doc)}
    assert paths - CUSTOM[("trainer.kubeflow.org/v1alpha1", "TrainJob")] == {"spec.trainer.imagee"}


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the manifests define, with where it is."""
    for name, doc in DOCUMENTS:
        kind = doc["kind"]
        if kind == "Deployment":
            yield name, doc["spec"]["template"]["spec"]
        elif kind == "Pod":
            yield name, doc["spec"]
        elif kind == "ClusterTrainingRuntime":
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                yield name, job["template"]["spec"]["template"]["spec"]


def test_every_pod_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    for dockerfile in ("server.Dockerfile", "sidecar.Dockerfile"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert re.search(rf"^USER {UID}:{UID}$", text, re.MULTILINE), dockerfile
    specs = list(pod_specs())
    assert len(specs) == 3
    for name, spec in specs:
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert (context["runAsUser"], context["runAsGroup"]) == (UID, UID), name
        for container in spec["containers"] + spec.get("initContainers", []):
            own = container["securityContext"]
            assert own["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert own["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert own["capabilities"]["drop"] == ["ALL"], (name, container["name"])
    for runtime in by_kind("ClusterServingRuntime"):
        for container in runtime["spec"]["containers"]:
            own = container["securityContext"]
            assert (own["runAsUser"], own["runAsNonRoot"]) == (UID, True)
            assert own["readOnlyRootFilesystem"] is True


def test_secrets_are_mounted_files_of_mode_0400() -> None:
    volumes = [v for _, spec in pod_specs() for v in spec["volumes"]]
    volumes += [v for r in by_kind("ClusterServingRuntime") for v in r["spec"]["volumes"]]
    secrets = [v["secret"] for v in volumes if "secret" in v]
    assert {s["secretName"] for s in secrets} == {"forseti-keyring", "forseti-control-token"}
    assert all(s["defaultMode"] == 0o400 for s in secrets), secrets


def server_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, spec in pod_specs():
        for container in spec["containers"]:
            if "serve" in " ".join(container.get("command", ["forseti", "serve"])):
                yield name, container
    for runtime in by_kind("ClusterServingRuntime"):
        yield runtime["metadata"]["name"], runtime["spec"]["containers"][0]


def test_servers_are_probed_with_grpc_health_and_drain_before_they_stop() -> None:
    servers = list(server_containers())
    assert len(servers) == 3  # the Deployment, the side-by-side Pod, the KServe runtime
    for name, container in servers:
        assert container["readinessProbe"]["grpc"]["port"] == GRPC_PORT, name
        # Liveness must not follow model readiness: a slow load never restarts a replica.
        assert "grpc" not in container["livenessProbe"], name
        args = container["args"]
        assert f"--grpc-port={GRPC_PORT}" in args, name
        drain = next(float(a.split("=")[1]) for a in args if a.startswith("--drain-seconds="))
        probe = container["readinessProbe"]
        # The drain outlasts the time the kubelet needs to see NOT_SERVING.
        assert drain > probe["periodSeconds"] * probe["failureThreshold"], name
    deployment = by_kind("Deployment")[0]
    spec = deployment["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    drain = float(next(a for a in args if a.startswith("--drain-seconds=")).split("=")[1])
    grace = float(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert spec["terminationGracePeriodSeconds"] > drain + grace


def test_services_budget_and_autoscaler_point_at_the_server_deployment() -> None:
    deployment = by_kind("Deployment")[0]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in by_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    pdb = by_kind("PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = by_kind("HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"


def test_kserve_and_trainer_references_resolve_within_deploy() -> None:
    runtimes = {r["metadata"]["name"] for r in by_kind("ClusterServingRuntime")}
    for isvc in by_kind("InferenceService"):
        assert isvc["spec"]["predictor"]["model"]["runtime"] in runtimes
    training = {r["metadata"]["name"]: r for r in by_kind("ClusterTrainingRuntime")}
    for job in by_kind("TrainJob"):
        ref = job["spec"]["runtimeRef"]
        assert ref["kind"] == "ClusterTrainingRuntime" and ref["name"] in training
        assert job["spec"]["trainer"]["command"][:3] == ["forseti", "train", "--continuous"]
        runtime = training[ref["name"]]["spec"]["template"]["spec"]["replicatedJobs"]
        # TrainJob.trainer overrides the job labelled as the trainer step, container "node".
        node = next(j for j in runtime if j["name"] == "node")
        step = node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"]
        assert step == "trainer"
        assert [c["name"] for c in node["template"]["spec"]["template"]["spec"]["containers"]] == [
            "node"
        ]


def trainer_specs() -> dict[str, Any]:
    return {
        cm["metadata"]["name"]: parse_spec(
            tomllib.loads(cm["data"]["sidecar.toml"]), source=cm["metadata"]["name"], base=Path("/")
        )
        for cm in by_kind("ConfigMap")
        if "sidecar.toml" in cm.get("data", {})
    }


def test_the_trainer_specs_parse_and_reach_every_replica() -> None:
    specs = trainer_specs()
    assert set(specs) == {"forseti-trainer-spec", "forseti-side-by-side-spec"}
    fleet = specs["forseti-trainer-spec"]
    headless = next(s for s in by_kind("Service") if s["spec"].get("clusterIP") == "None")
    assert fleet.server.replicas_dns == f"{headless['metadata']['name']}:{GRPC_PORT}"
    raw = tomllib.loads(by_name("ConfigMap", "forseti-trainer-spec")["data"]["sidecar.toml"])
    assert raw["checkpoint"]["directory"].startswith("s3://")
    assert raw["model"]["repository"].startswith("s3://")
    assert fleet.server.token_file is not None
    side = specs["forseti-side-by-side-spec"]
    assert side.server.url == f"127.0.0.1:{GRPC_PORT}"


HTTP_PORT = 8000


def served_ports(args: list[str]) -> dict[str, int]:
    """The ports `forseti serve` listens on with these arguments, read by its own parser."""
    options = serve_parser().parse_args(args)
    ports = {"metrics": options.metrics_port}
    if options.allow_grpc:
        ports["grpc"] = options.grpc_port
    if options.allow_http:
        ports["http"] = options.http_port
    return ports


def test_every_port_the_servers_listen_on_is_declared_by_name() -> None:
    for name, container in server_containers():
        args = container["args"]
        # Stated, not left to the default, so the manifest says what it exposes.
        assert f"--http-port={HTTP_PORT}" in args, name
        declared = {p["containerPort"]: p.get("name") for p in container["ports"]}
        for kind, port in served_ports(args).items():
            assert port in declared, (name, kind, port)
            if kind == "http":
                assert declared[port] == "http", name
        # KServe routes to the first port: the gRPC one (protocolVersions grpc-v2).
        assert container["ports"][0]["containerPort"] == GRPC_PORT, name


def test_the_services_expose_the_servers_grpc_and_http_ports() -> None:
    deployment = by_kind("Deployment")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    by_port_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    listening = served_ports(container["args"])
    for service in by_kind("Service"):
        targets = {
            by_port_name.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]
        }
        assert {listening["grpc"], listening["http"]} <= targets, service["metadata"]["name"]


def test_the_server_image_and_compose_expose_grpc_and_http() -> None:
    dockerfile = (ROOT / "docker" / "server.Dockerfile").read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)[1].split()}
    cmd = json.loads(
        re.search(r"^CMD (\[.*?\])$", dockerfile.replace("\\\n", ""), re.MULTILINE | re.DOTALL)[1]
    )
    assert "--http-port" in cmd
    listening = served_ports(cmd)
    assert set(listening.values()) <= exposed
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    published = {int(p.rsplit(":", 1)[1]) for p in compose["services"]["server"]["ports"]}
    assert set(listening.values()) <= published
