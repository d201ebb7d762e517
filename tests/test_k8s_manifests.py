"""deploy/k8s: the kustomize base and the dev overlay, checked without a cluster.

Each is rendered here the way `kubectl kustomize` renders it (the few kustomize features the
files use: resources, namespace, configMapGenerator with merge, images, JSON 6902 patches; where
kubectl is installed its own rendering must be the same), then:
- every object validates against the Kubernetes OpenAPI schemas, strictly (unknown fields are
  errors), for the oldest and newest versions the `kubernetes-validate` wheel ships offline;
- the ports, environment and probes agree with common/settings.py and with the Envoy config that
  the gateway's init container renders (the same command as docker-compose's gateway-config job):
  every upstream cluster is a Service of the manifests on the right port, every probe asks the
  container's own gRPC port or the gateway's /readyz and /healthz, every env name is a setting,
  and secrets come only from `secretKeyRef`;
- each stateless Deployment has resource requests and limits, a PodDisruptionBudget and a
  HorizontalPodAutoscaler, and terminationGracePeriodSeconds = GRPC_SHUTDOWN_GRACE_SECONDS + 5;
- the NetworkPolicies let only the gateway reach the agent, only the gateway and the agent
  reach task-service and conversation-service; everything else in the namespace is denied.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as validate_utils

from common.settings import Settings, documented_settings, port_of
from gateway import envoy_config
from tests.test_deploy_config import COMPOSE, _validate

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev"}
SETTINGS = {name for name, _default, _doc in documented_settings()}
# Settings whose values are secrets (or hold credentials): only ever from a Secret.
SECRET_SETTINGS = {
    "BETTER_AUTH_SECRET",
    "TASK_DATABASE_URL",
    "TASK_DATABASE_MIGRATION_URL",
    "CONVERSATION_DATABASE_URL",
    "CONVERSATION_DATABASE_MIGRATION_URL",
    "LLM_API_KEY",
    "RATE_LIMIT_REDIS_URL",
    "PAGE_TOKEN_SECRET",
}
SERVICES = {  # Deployment -> (service name in settings, module)
    "task-service": ("task", "task_service"),
    "conversation-service": ("conversation", "conversation_service"),
    "agent-service": ("agent", "agent_service"),
}
SHUTDOWN_MARGIN_SECONDS = 5


# --- the renderer: what `kubectl kustomize` does with these files -------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _pointer(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for raw in path.lstrip("/").split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        parts.append(int(part) if part.isdigit() else part)
    return parts


def _json_patch(resource: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node: Any = resource
        for part in parents:
            node = node[part]
        if operation["op"] in ("replace", "add"):
            if isinstance(node, list) and operation["op"] == "add":
                node.insert(len(node) if last == "-" else int(last), operation["value"])
            else:
                node[last] = copy.deepcopy(operation["value"])
        elif operation["op"] == "remove":
            del node[last]
        else:
            raise AssertionError(f"unsupported patch operation {operation}")


def _matches(resource: dict[str, Any], target: dict[str, str]) -> bool:
    if "kind" in target and resource["kind"] != target["kind"]:
        return False
    return "name" not in target or re.fullmatch(target["name"], resource["metadata"]["name"]) is not None


def _containers(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if resource["kind"] != "Deployment":
        return
    spec = resource["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects of the kustomization in `directory`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "configMapGenerator",
        "generatorOptions",
        "images",
        "patches",
    }
    assert not unknown, f"kustomize features this renderer does not know: {unknown}"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render(path) if path.is_dir() else _documents(path))
    assert kustomization.get("generatorOptions", {}).get("disableNameSuffixHash") or not kustomization.get(
        "configMapGenerator"
    ), "names with hash suffixes are not rendered here"
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        if generator.get("behavior") == "merge":
            [existing] = [
                r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == generator["name"]
            ]
            existing["data"].update(data)
        else:
            resources.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
            )
    for image in kustomization.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                name = container["image"].split(":")[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for patch in kustomization.get("patches", []):
        for resource in resources:
            if _matches(resource, patch["target"]):
                _json_patch(resource, yaml.safe_load(patch["patch"]))
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] != "Namespace":
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(KUSTOMIZATIONS[request.param])


def objects(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {resource["metadata"]["name"]: resource for resource in manifests if resource["kind"] == kind}


def config_map(manifests: list[dict[str, Any]]) -> dict[str, str]:
    return dict(objects(manifests, "ConfigMap")["todo-config"]["data"])


def container_env(manifests: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container sees: its envFrom ConfigMaps, then its own literal values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= objects(manifests, "ConfigMap")[source["configMapRef"]["name"]]["data"]
    env |= {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    return env


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_rendering_matches_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are still rendered and checked by this file's renderer")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    theirs = {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all(result.stdout) if r}
    ours = {(r["kind"], r["metadata"]["name"]): r for r in render(KUSTOMIZATIONS[name])}
    assert ours == theirs


@pytest.mark.parametrize("version", [validate_utils.all_versions()[0], validate_utils.latest_version()])
def test_every_object_validates_against_the_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    for resource in manifests:
        kubernetes_validate.validate(resource, version, strict=True)
    kinds = {resource["kind"] for resource in manifests}
    expected = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "ConfigMap"}
    assert expected <= kinds


def test_a_deployment_service_pdb_and_hpa_for_each_part(manifests: list[dict[str, Any]]) -> None:
    deployments = objects(manifests, "Deployment")
    assert set(deployments) == {*SERVICES, "gateway"}
    services, budgets = objects(manifests, "Service"), objects(manifests, "PodDisruptionBudget")
    autoscalers = objects(manifests, "HorizontalPodAutoscaler")
    for name, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert services[name]["spec"]["selector"].items() <= pod_labels.items()
        assert budgets[name]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert budgets[name]["spec"].get("maxUnavailable") == 1
        target = autoscalers[name]["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert "replicas" not in deployment["spec"], f"{name}: the autoscaler owns the replica count"
        assert 1 <= autoscalers[name]["spec"]["minReplicas"] <= autoscalers[name]["spec"]["maxReplicas"]
        for container in _containers(deployment):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_listen_where_the_settings_and_the_other_parts_say(manifests: list[dict[str, Any]]) -> None:
    deployments, services = objects(manifests, "Deployment"), objects(manifests, "Service")
    defaults = Settings()
    for name, (service, module) in SERVICES.items():
        container = only_container(deployments[name])
        assert container["command"] == ["python", "-m", module]
        env = container_env(manifests, container)
        settings = Settings.load(env)
        grpc_port = port_of(getattr(settings, f"{service}_service_addr"))
        metrics_port = getattr(settings, f"{service}_metrics_port")
        # The manifests' ports are the settings' defaults, so the docs and compose tell the same story.
        assert grpc_port == port_of(getattr(defaults, f"{service}_service_addr"))
        assert metrics_port == getattr(defaults, f"{service}_metrics_port")
        assert env[f"{service.upper()}_SERVICE_ADDR"] == f"{name}:{grpc_port}"
        assert settings.grpc_bind_host == "0.0.0.0"
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["grpc"] == grpc_port and ports["metrics"] == metrics_port
        service_ports = {port["name"]: port["port"] for port in services[name]["spec"]["ports"]}
        assert service_ports["grpc"] == grpc_port and service_ports["metrics"] == metrics_port
        assert services[name]["spec"]["clusterIP"] == "None", "headless: clients see every pod"
        if service == "agent":
            assert ports["mcp"] == service_ports["mcp"] == settings.agent_http_port
            assert settings.agent_http_host == "0.0.0.0"
            for upstream in ("task", "conversation"):  # the agent reaches the others by their Service
                address = getattr(settings, f"{upstream}_service_addr")
                host, port = address.rsplit(":", 1)
                assert {p["name"]: p["port"] for p in services[host]["spec"]["ports"]}["grpc"] == int(port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port}, (name, probe)


def test_environment_names_are_settings_and_secrets_are_references(manifests: list[dict[str, Any]]) -> None:
    assert not objects(manifests, "Secret"), "secrets are created in the cluster, never kept in these files"
    assert set(config_map(manifests)) <= SETTINGS
    assert not set(config_map(manifests)) & SECRET_SETTINGS
    for deployment in objects(manifests, "Deployment").values():
        for container in _containers(deployment):
            for item in container.get("env", []):
                assert item["name"] in SETTINGS, (container["name"], item["name"])
                if item["name"] in SECRET_SETTINGS:
                    assert set(item) == {"name", "valueFrom"}, item
                    assert item["valueFrom"]["secretKeyRef"]["name"] == "todo-secrets"
                else:
                    assert "value" in item, item
    required = {
        (item["name"], item["valueFrom"]["secretKeyRef"].get("optional", False))
        for deployment in objects(manifests, "Deployment").values()
        for container in _containers(deployment)
        for item in container.get("env", [])
        if "valueFrom" in item
    }
    mandatory = {name for name, optional in required if not optional}
    assert mandatory == {"BETTER_AUTH_SECRET", "TASK_DATABASE_URL", "CONVERSATION_DATABASE_URL"}


def test_termination_grace_covers_the_shutdown_grace(manifests: list[dict[str, Any]]) -> None:
    grace = float(config_map(manifests)["GRPC_SHUTDOWN_GRACE_SECONDS"])
    for name, deployment in objects(manifests, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"]:
            env = container_env(manifests, container)
            if name in SERVICES:
                assert float(env["GRPC_SHUTDOWN_GRACE_SECONDS"]) == grace
        assert spec["terminationGracePeriodSeconds"] == grace + SHUTDOWN_MARGIN_SECONDS, name


def gateway_settings(manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], Settings]:
    deployment = objects(manifests, "Deployment")["gateway"]
    [init] = deployment["spec"]["template"]["spec"]["initContainers"]
    return init, Settings.load(container_env(manifests, init))


def test_the_gateway_renders_the_compose_config_for_these_services(
    manifests: list[dict[str, Any]], tmp_path: Path
) -> None:
    init, settings = gateway_settings(manifests)
    # The same command as compose's one-shot job, into the volume Envoy reads.
    assert init["command"] == COMPOSE["services"]["gateway-config"]["command"]
    envoy = only_container(objects(manifests, "Deployment")["gateway"])
    assert envoy["image"] == COMPOSE["services"]["envoy"]["image"]
    assert envoy["args"][:2] == COMPOSE["services"]["envoy"]["command"][:2]
    [init_mount], [envoy_mount] = init["volumeMounts"], envoy["volumeMounts"]
    assert init_mount["name"] == envoy_mount["name"] and envoy_mount["mountPath"] == envoy_config.CONTAINER_CONFIG_DIR

    config = envoy_config.render(
        settings,
        "docker",
        descriptor_path=str(ROOT / "build" / "todo.pb"),
        openapi_path=str(ROOT / "build" / "openapi.json"),
    )
    services = objects(manifests, "Service")
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in {envoy_config.UNROUTED_CLUSTER, envoy_config.ADMIN_CLUSTER}:
            continue
        [endpoints] = cluster["load_assignment"]["endpoints"]
        for endpoint in endpoints["lb_endpoints"]:
            address = endpoint["endpoint"]["address"]["socket_address"]
            assert cluster["type"] == "STRICT_DNS", cluster["name"]
            service_ports = [port["port"] for port in services[address["address"]]["spec"]["ports"]]
            assert address["port_value"] in service_ports, (cluster["name"], address)
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    ports = {port["name"]: port["containerPort"] for port in envoy["ports"]}
    assert listener == {"address": "0.0.0.0", "port_value": ports["http"]}
    assert ports["stats"] == envoy_config.CONTAINER_STATS_PORT
    assert {port["name"]: port["port"] for port in services["gateway"]["spec"]["ports"]}["http"] == ports["http"]
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert envoy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The agent's Host check lets the gateway's (and the Service's) Host headers through.
    agent_env = container_env(manifests, only_container(objects(manifests, "Deployment")["agent-service"]))
    assert "agent-service:*" in agent_env["MCP_ALLOWED_HOSTS"].split(",")
    # And real Envoy accepts it.
    result = _validate(envoy_config.write(config, tmp_path / "envoy.yaml"))
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def _allowed_sources(policy: dict[str, Any], port: str) -> list[dict[str, Any]]:
    """The `from` peers of the rules that open `port` ({} = anyone)."""
    peers: list[dict[str, Any]] = []
    for rule in policy["spec"].get("ingress", []):
        if any(item["port"] == port for item in rule.get("ports", [])):
            peers.extend(rule.get("from", [{}]))
    return peers


def test_network_policies_let_only_the_gateway_reach_the_services(manifests: list[dict[str, Any]]) -> None:
    policies = objects(manifests, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def pods(peers: list[dict[str, Any]]) -> set[str]:
        assert all(set(peer) == {"podSelector"} for peer in peers), peers
        return {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in peers}

    assert pods(_allowed_sources(policies["agent-service"], "grpc")) == {"gateway"}
    assert pods(_allowed_sources(policies["agent-service"], "mcp")) == {"gateway"}
    for name in ("task-service", "conversation-service"):
        assert pods(_allowed_sources(policies[name], "grpc")) == {"gateway", "agent-service"}
    assert _allowed_sources(policies["gateway"], "http") == [{}], "the gateway is the public entry"
    for name in (*SERVICES, "gateway"):
        port = "stats" if name == "gateway" else "metrics"
        [monitoring] = _allowed_sources(policies[name], port)
        assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        selector = policies[name]["spec"]["podSelector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/name": name}
        # Every port the policy names is a named port of that Deployment's containers.
        named = {
            port["name"]
            for container in _containers(objects(manifests, "Deployment")[name])
            for port in container.get("ports", [])
        }
        opened = {item["port"] for rule in policies[name]["spec"]["ingress"] for item in rule["ports"]}
        assert opened <= named, (name, opened - named)


def test_the_dev_overlay() -> None:
    dev = render(KUSTOMIZATIONS["dev"])
    assert {r["metadata"].get("namespace") for r in dev if r["kind"] != "Namespace"} == {"todo-dev"}
    assert objects(dev, "Namespace")["todo-dev"]
    images = {c["image"] for d in objects(dev, "Deployment").values() for c in _containers(d)}
    assert images == {"todo-chatbot:local", COMPOSE["services"]["envoy"]["image"]}
    assert {hpa["spec"]["minReplicas"] for hpa in objects(dev, "HorizontalPodAutoscaler").values()} == {1}
    _, settings = gateway_settings(dev)
    assert settings.public_base_url == "http://127.0.0.1:8080"
