"""Turn a pydantic model into a Kubernetes structural OpenAPI v3 schema.

Structural means: every node has a type, no $ref, no anyOf/oneOf carrying
types, no uniqueItems. Kubernetes extensions (x-kubernetes-*) come from each
field's `json_schema_extra` and pass through untouched.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

# JSON Schema keywords the apiserver accepts in a structural schema; pydantic's
# others (title, discriminator, ...) are dropped.
_KEEP = {
    "type",
    "format",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
}


# JSON has one number type: the apiserver's schema check takes 2.0 for an integer
# field, but a CEL rule that reads the field fails on it ("expected int, got
# float64"). So each integer field of a spec reads itself once: 2.0 is refused
# everywhere, with the field named, as the models refuse it (ApiModel.from_wire).
INTEGER_RULE = {"rule": "self == self", "message": "must be an integer, without a decimal point"}


def structural_schema(model: type[BaseModel], *, strict_integers: bool = False) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    out = _convert(raw, defs)
    if strict_integers:
        _guard_integers(out)
    return out


def _guard_integers(node: dict[str, Any]) -> None:
    if node.get("type") == "integer":
        node["x-kubernetes-validations"] = [
            dict(INTEGER_RULE),
            *node.get("x-kubernetes-validations", []),
        ]
    for child in (node.get("properties") or {}).values():
        _guard_integers(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _guard_integers(node[key])


def _merge(base: dict[str, Any], field: dict[str, Any], skip: str) -> dict[str, Any]:
    """A field's keys override its type's, except CEL rules, which add up."""
    merged = dict(base)
    for key, value in field.items():
        if key == skip:
            continue
        if key == "x-kubernetes-validations":
            merged[key] = list(base.get(key, [])) + list(value)
        else:
            merged[key] = value
    return merged


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline $ref (and pydantic's allOf-of-one-ref)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _resolve(_merge(copy.deepcopy(defs[name]), node, "$ref"), defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        return _merge(_resolve(node["allOf"][0], defs), node, "allOf")
    any_of = node.get("anyOf")
    if any_of:
        # Optional[X] is anyOf [X, null]: an absent field, not a nullable one.
        non_null = [n for n in any_of if n.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        merged = _merge(_resolve(non_null[0], defs), node, "anyOf")
        if merged.get("default") is None:
            merged.pop("default", None)
        return merged
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(dict(node), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key in _KEEP:
            out[key] = value
    if "properties" in out:
        out["properties"] = {k: _convert(v, defs) for k, v in out["properties"].items()}
        out.setdefault("type", "object")
    if out.get("default") == {} and "properties" in out:
        # The apiserver checks a default against CEL rules without applying the
        # nested defaults first, so spell them out.
        out["default"] = _nested_defaults(out)
    if "items" in out:
        out["items"] = _convert(out["items"], defs)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(out["additionalProperties"], defs)
    elif out.get("additionalProperties") is False:
        # extra="forbid" in pydantic; the apiserver prunes unknown fields anyway.
        del out["additionalProperties"]
    if out.get("type") == "integer":
        out.setdefault("format", "int64")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "type" not in out:
        raise ValueError(f"schema node without a type: {node}")
    return out


def _nested_defaults(node: dict[str, Any]) -> dict[str, Any]:
    return {
        name: prop["default"]
        for name, prop in node.get("properties", {}).items()
        if "default" in prop
    }
