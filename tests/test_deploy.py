"""deploy/: every YAML file parses, the traceguard config in it is valid, the manifests
hold what the patterns need, and the Collector configs pass the built Collector's
``validate`` (deploy/collector/build makes it; the check runs when it is there)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from traceguard.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COLLECTOR = DEPLOY.parent / ".collector" / "build" / "otelcol-traceguard"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    assert documents(path)


def traceguard_configs() -> list[tuple[str, str]]:
    """The image's default config and the ConfigMaps' ones, as text."""
    found = [("traceguard.yaml", (DEPLOY / "traceguard.yaml").read_text())]
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in documents(path):
            if doc["kind"] == "ConfigMap":
                found.append((f"{path.name}:{doc['metadata']['name']}", doc["data"]["traceguard.yaml"]))
    return found


CONFIGS = traceguard_configs()


@pytest.mark.parametrize("text", [text for _, text in CONFIGS], ids=[name for name, _ in CONFIGS])
def test_traceguard_configs_are_valid(text, tmp_path):
    path = tmp_path / "traceguard.yaml"
    path.write_text(text)
    load_config(path, environ={})  # raises ConfigError naming the key


def test_stream_processor_manifest_has_probes_limits_and_a_disruption_budget():
    docs = {doc["kind"]: doc for doc in documents(DEPLOY / "k8s" / "consume.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "consume"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["memory"]
    assert docs["PodDisruptionBudget"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]
    config = yaml.safe_load(docs["ConfigMap"]["data"]["traceguard.yaml"])
    assert config["consume"]["api_listen"].endswith(":8080")  # what the probes call


def test_load_balanced_manifest_is_the_backend_set_the_collector_routes_to():
    """The Collector's load_balancing hostnames are this StatefulSet's pods behind its
    headless Service, and the replicas share one judge through Kafka."""
    docs = {doc["kind"]: doc for doc in documents(DEPLOY / "k8s" / "loadbalanced.yaml")}
    service, statefulset = docs["Service"], docs["StatefulSet"]
    assert service["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert docs["PodDisruptionBudget"]["spec"]["selector"] == statefulset["spec"]["selector"]
    balancing = documents(DEPLOY / "collector" / "loadbalancing.yaml")[0]["exporters"]["load_balancing"]
    default = balancing["resolver"]["static"]["hostnames"].split(":-", 1)[1].rstrip("}")
    pods = {f"{statefulset['metadata']['name']}-{i}.{service['metadata']['name']}:4317"
            for i in range(statefulset["spec"]["replicas"])}
    assert set(yaml.safe_load(default)) == pods
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "serve" and pod["enableServiceLinks"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {v["metadata"]["name"] for v in statefulset["spec"]["volumeClaimTemplates"]} == {"state"}
    config = yaml.safe_load(docs["ConfigMap"]["data"]["traceguard.yaml"])
    assert config["serve"]["grpc_listen"] == "0.0.0.0:4317" and config["consume"]["decided_topic"]


def test_sidecar_manifest_points_the_app_at_localhost_and_forwards():
    docs = {doc["kind"]: doc for doc in documents(DEPLOY / "k8s" / "sidecar.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (app,), (sidecar,) = pod["containers"], pod["initContainers"]
    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://localhost:4317"} in app["env"]
    assert sidecar["args"][0] == "serve"
    config = yaml.safe_load(docs["ConfigMap"]["data"]["traceguard.yaml"])
    assert config["serve"]["forward_to"] and config["serve"]["grpc_listen"] == "127.0.0.1:4317"


def test_the_sidecar_stays_out_of_the_apps_way():
    """A native sidecar (up before the app, down after it) whose port, scrape
    annotations, user and security settings are its own, not the pod's."""
    docs = {doc["kind"]: doc for doc in documents(DEPLOY / "k8s" / "sidecar.yaml")}
    template = docs["Deployment"]["spec"]["template"]
    pod = template["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    api_port = int(yaml.safe_load(docs["ConfigMap"]["data"]["traceguard.yaml"])["serve"]["api_listen"].rsplit(":")[1])
    assert api_port != 8080 and sidecar["ports"] == [{"name": "traceguard-api", "containerPort": api_port}]
    assert not any(key.startswith("prometheus.io/") for key in template["metadata"].get("annotations", {}))
    assert "securityContext" not in pod and pod["enableServiceLinks"] is False
    context = sidecar["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]} and context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert all(volume["emptyDir"].get("sizeLimit") for volume in pod["volumes"] if "emptyDir" in volume)


def manifests() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}", doc) for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for doc in documents(path)]


@pytest.mark.parametrize("doc", [doc for _, doc in manifests()], ids=[name for name, _ in manifests()])
def test_manifests_are_valid_kubernetes_objects(doc):
    """Against the Kubernetes 1.33 OpenAPI schema (kubernetes-validate bundles it),
    strictly: an unknown or misspelt field is an error, not ignored."""
    kubernetes_validate.validate(doc, "1.33", strict=True)


def test_the_schema_check_is_strict():
    doc = dict(documents(DEPLOY / "k8s" / "sidecar.yaml")[1])
    doc["spec"] = {**doc["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_collector_configs_follow_the_partitioning_traceguard_needs():
    kafka = documents(DEPLOY / "collector" / "kafka.yaml")[0]["exporters"]["kafka"]
    assert kafka["partition_traces_by_id"] and kafka["partition_logs_by_trace_id"]
    balancing = documents(DEPLOY / "collector" / "loadbalancing.yaml")[0]["exporters"]["load_balancing"]
    assert balancing["routing_key"] == "traceID"


def test_the_image_runs_the_console_script_as_a_non_root_user_with_a_health_check():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["traceguard"]' in dockerfile
    assert "USER 10001" in dockerfile and "/healthz" in dockerfile and "FROM python:3.11-slim" in dockerfile
    build_stage = dockerfile.split("\nFROM ")[1]
    assert "gcc" in build_stage and "pip install" in build_stage  # the C decoder is compiled there


@pytest.mark.skipif(not COLLECTOR.exists(), reason="the Collector is not built (deploy/collector/build)")
@pytest.mark.parametrize("name", ["kafka.yaml", "loadbalancing.yaml"])
def test_collector_configs_pass_the_built_collectors_validate(name):
    result = subprocess.run([str(COLLECTOR), "validate", "--config", str(DEPLOY / "collector" / name)],
                            capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode == 0, result.stderr
