"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/k8s) checked offline: against the Compose
specification's schema and Kubernetes' schemas (from packages), and against the code they call."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from pydantic import AliasChoices

from agentcomms import Settings, load_agents_config
from agentcomms.cli import app

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.31.0"
"""The oldest Kubernetes the manifests are checked against (still supported by the package's schemas)."""


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}#{n}", doc) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for n, doc in enumerate(documents(p))
    ]


def setting_names() -> set[str]:
    """Every environment variable Settings reads."""
    names = {"REDIS_URL", "REDIS_PASSWORD", "LOG_LEVEL"}
    for name, field in Settings.model_fields.items():
        names.add(name.upper())
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
    return names


def run_agent_options() -> set[str]:
    group = typer.main.get_command(app)
    command: click.Command = group.commands["run-agent"]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def containers() -> list[tuple[str, list[str], list[str]]]:
    """(where, args, env names) of every container of the manifests and every Compose service."""
    found = []
    for where, doc in manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            env = [e["name"] for e in container.get("env", [])]
            found.append((where, container.get("args", []), env))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("agentcomms"):
            found.append((f"compose:{name}", service["command"], list(service.get("environment", {}))))
    return found


def test_compose_follows_the_compose_specification() -> None:
    schema = json.loads(
        (importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    )
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    assert set(compose["services"]) == {"redis", "knowledge", "agent-cso", "agent-cto", "dashboard"}
    redis = compose["services"]["redis"]["command"]
    assert "--appendonly" in redis and "--requirepass" in redis  # AOF and a password
    assert compose["services"]["dashboard"]["ports"] == ["127.0.0.1:8765:8765"]


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[where for where, _ in manifests()])
def test_each_manifest_follows_the_kubernetes_schemas(where: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises ValidationError with where it is wrong


def test_the_manifests_have_what_a_deployment_needs() -> None:
    kinds: dict[str, list[str]] = {}
    for _, doc in manifests():
        kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert {"agent-cso", "agent-cto", "dashboard", "knowledge"} <= set(kinds["Deployment"])
    assert kinds["Service"] == ["dashboard"] and kinds["Ingress"] == ["dashboard"]
    assert kinds["ConfigMap"] == ["agentcomms-agents"] and kinds["Secret"] == ["agentcomms-credentials"]
    assert set(kinds["PodDisruptionBudget"]) == {"agent-cso", "agent-cto"}
    for _, doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        [container] = doc["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_what_the_files_run_exists_in_the_code() -> None:
    options, names = run_agent_options(), setting_names()
    configs = {
        "deploy/agents.json": {a.agent_id for a in load_agents_config(DEPLOY / "agents.json").agents},
    }
    [configmap] = [doc for _, doc in manifests() if doc["kind"] == "ConfigMap"]
    in_configmap = {a["agent_id"] for a in json.loads(configmap["data"]["agents.json"])["agents"]}
    assert in_configmap == configs["deploy/agents.json"]
    secret = next(doc for _, doc in manifests() if doc["kind"] == "Secret")
    assert set(secret["stringData"]) <= names
    checked = 0
    for where, args, env in containers():
        assert set(env) <= names, f"{where}: {set(env) - names} are not settings"
        if args and args[0] == "run-agent":
            flags = {arg for arg in args if arg.startswith("--")}
            assert flags <= options, f"{where}: run-agent has no {flags - options}"
            agent_id = args[args.index("--agent-id") + 1]
            assert agent_id in in_configmap, f"{where}: {agent_id} is not in the agents' config"
            checked += 1
    assert checked == 4  # two agents in Compose, two in Kubernetes


def test_the_image_runs_as_a_user_not_root() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert (
        users == ["10001"]
        and lines[0].startswith("#")
        and any(line.startswith("FROM python:3.11-slim") for line in lines)
    )
    assert any(line.startswith('ENTRYPOINT ["agentcomms"]') for line in lines)
