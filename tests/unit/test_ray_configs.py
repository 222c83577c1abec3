"""The shipped Ray Serve configs (deploy/ray, and the serveConfigV2 of the KubeRay
RayServices) are valid Serve configs whose import path is the application builder and
whose args are adapterserve settings."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from adapterserve.config import Settings

pytest.importorskip("ray.serve")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def serve_configs() -> list[tuple[str, dict]]:
    configs = [("serve-config.yaml", yaml.safe_load((DEPLOY / "ray" / "serve-config.yaml").read_text()))]
    for manifest in sorted((DEPLOY / "kubernetes").glob("rayservice-*.yaml")):
        service = yaml.safe_load(manifest.read_text())
        assert service["kind"] == "RayService"
        configs.append((manifest.name, yaml.safe_load(service["spec"]["serveConfigV2"])))
    return configs


@pytest.mark.parametrize("name, config", serve_configs(), ids=[name for name, _ in serve_configs()])
def test_shipped_serve_configs_name_the_builder_and_real_settings(name, config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own schema of `serve deploy` configs
    (app,) = config["applications"]
    module, attribute = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), attribute).__name__ == "build"
    unknown = set(app["args"]) - set(Settings.model_fields) - {"config"}
    assert not unknown, f"{name}: not adapterserve settings: {unknown}"
    Settings.model_validate(app["args"])
    deployments = {d["name"] for d in app["deployments"]}
    assert deployments == {"EngineReplica", "Ingress"}
    replicas = next(d for d in app["deployments"] if d["name"] == "EngineReplica")["autoscaling_config"]
    assert 1 <= replicas["min_replicas"] <= replicas["max_replicas"] and replicas["target_ongoing_requests"] > 0


def test_the_rayservices_use_token_auth_and_only_the_api_port_is_open():
    names = set()
    for manifest in sorted((DEPLOY / "kubernetes").glob("rayservice-*.yaml")):
        service = yaml.safe_load(manifest.read_text())
        assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}, manifest.name
        names.add(service["metadata"]["name"])
    policy = yaml.safe_load((DEPLOY / "kubernetes" / "networkpolicy-ray.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    own = policy["spec"]["podSelector"]
    (expression,) = own["matchExpressions"]
    assert expression["key"] == "ray.io/originated-from-cr-name" and expression["operator"] == "In"
    assert set(expression["values"]) == names
    for rule in policy["spec"]["ingress"]:
        if "from" not in rule:  # from anywhere: the API port only
            assert [p["port"] for p in rule["ports"]] == [8000]
        elif any("podSelector" in source for source in rule["from"]):
            assert all(source["podSelector"] == own for source in rule["from"])
        else:
            assert {p["port"] for p in rule["ports"]} <= {8000, 8265}
