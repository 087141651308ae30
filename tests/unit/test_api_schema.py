"""The committed CRDs are what the models generate, and they are structural."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from ferry_api import generate

FORBIDDEN = {"$ref", "anyOf", "oneOf", "allOf", "uniqueItems", "title", "const"}


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        out += walk(child, f"{path}.{name}")
    if "items" in node:
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_committed_crds_are_not_stale() -> None:
    stale = generate.write_all(check=True)
    assert not stale, f"run `make crds`: {[p.name for p in stale]}"


@pytest.mark.parametrize("model", generate.KINDS, ids=lambda m: m.KIND)
def test_schema_is_structural_and_documented(model: Any) -> None:
    crd = generate.crd(model)
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path, node in walk(root["properties"][part], part):
            assert "type" in node, f"{path} has no type"
            assert not FORBIDDEN & node.keys(), f"{path} uses {FORBIDDEN & node.keys()}"
            if path != part and not path.endswith(("[]", "{}")):
                assert node.get("description"), f"{path} has no description"


def test_crd_names_and_columns() -> None:
    by_kind = {
        yaml.safe_load(generate.render(m))["spec"]["names"]["kind"]: m for m in generate.KINDS
    }
    assert set(by_kind) == {"WeightSource", "RefitJob", "ArtifactCache"}
    for model in generate.KINDS:
        crd = generate.crd(model)
        names = crd["spec"]["names"]
        assert names["categories"] == ["ferry"]
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["versions"][0]["name"] == "v1alpha1"
    shorts = {m.KIND: generate.crd(m)["spec"]["names"]["shortNames"] for m in generate.KINDS}
    assert shorts == {"WeightSource": ["ws"], "RefitJob": ["rj"], "ArtifactCache": ["ac"]}


def test_immutable_fields_carry_transition_rules() -> None:
    from ferry_api.refitjob import RefitJob

    spec = generate.crd(RefitJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"
    ]
    for field in ("sourceRef", "targets", "version", "strategy", "transform"):
        rules = [r["rule"] for r in spec["properties"][field].get("x-kubernetes-validations", [])]
        assert "self == oldSelf" in rules, field
    # a field that may change carries no such rule
    rules = [
        r["rule"] for r in spec["properties"]["timeoutSeconds"].get("x-kubernetes-validations", [])
    ]
    assert "self == oldSelf" not in rules


def test_nested_object_defaults_spelled_out() -> None:
    from ferry_api.weightsource import WeightSource

    spec = generate.crd(WeightSource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]
    assert spec["properties"]["heartbeat"]["default"] == {
        "leaseDurationSeconds": 15,
        "renewIntervalSeconds": 5,
    }
    assert spec["properties"]["rails"]["default"] == {"mode": "auto"}


def test_api_reference_is_not_stale() -> None:
    from ferry_api import apidocs

    assert not apidocs.write(check=True), "run `make crds` to regenerate docs/api.md"


def test_identity_requirements_match_the_agent() -> None:
    """The CRD's CEL rules and the agent's identity check require the same fields."""
    from ferry_agent.artifacts.identity import REQUIRED
    from ferry_api.artifactcache import REQUIRED_IDENTITY

    assert REQUIRED_IDENTITY == REQUIRED
