"""Types shared by the three kinds: base model config, selectors, conditions.

Field names are camelCase on the wire (Kubernetes convention) and snake_case
in Python; `model_dump(by_alias=True)` gives the wire form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# Kubernetes object names (RFC 1123 subdomain) and label values.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Condition reasons are CamelCase identifiers (metav1.Condition).
REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule of one type, written twice side by side: `cel` for the
    apiserver (x-kubernetes-validations) and `holds` over the validated model for
    pydantic. tests/integration/test_fuzz_crs.py checks that the two agree."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None
    reason: str | None = None

    def schema(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _rules_schema(schema: dict[str, Any], cls: type) -> None:
    rules = getattr(cls, "RULES", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.schema() for r in rules]


class ApiModel(BaseModel):
    """Base for every API type: camelCase aliases, unknown fields rejected, and each
    type's cross-field `RULES` checked here and emitted as CEL in the CRD."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        json_schema_extra=_rules_schema,
    )
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).RULES:
            if not rule.holds(self):
                raise ValueError(rule.message)
        return self

    def wire(self) -> dict[str, Any]:
        """The object as it appears in the apiserver (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    @classmethod
    def from_wire(cls, obj: Any) -> Any:
        """Validate `obj` as the apiserver reads JSON: a null field or map value is
        absent (pruned), and nothing is coerced (no "3", true or 3.0 for an integer,
        no 1 for a string; schema.INTEGER_RULE refuses 3.0 on the apiserver side)."""
        return cls.model_validate(_prune_nulls(obj), strict=True)


def _prune_nulls(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _prune_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_prune_nulls(v) for v in obj]
    return obj


def unique(items: list[Any]) -> list[Any]:
    """Items of an x-kubernetes-list-type: set list, which the apiserver keeps unique."""
    seen: list[Any] = []
    for item in items:
        if item in seen:
            raise ValueError(f"duplicate value {item!r}")
        seen.append(item)
    return items


def k8s(
    *,
    validations: list[dict[str, str]] | None = None,
    list_type: Literal["atomic", "set", "map"] | None = None,
    map_keys: list[str] | None = None,
    default: Any = None,
    immutable: str | None = None,
) -> dict[str, Any]:
    """Kubernetes schema extensions for a field (`json_schema_extra`)."""
    extra: dict[str, Any] = {}
    rules = list(validations or [])
    if immutable:
        rules.append({"rule": "self == oldSelf", "message": immutable})
    if rules:
        extra["x-kubernetes-validations"] = rules
    if list_type:
        extra["x-kubernetes-list-type"] = list_type
    if map_keys:
        extra["x-kubernetes-list-map-keys"] = map_keys
    if default is not None:
        extra["default"] = default
    return extra


class LabelSelectorRequirement(ApiModel):
    RULES = (
        Rule(
            cel="self.operator in ['Exists', 'DoesNotExist'] || has(self.values) && size(self.values) > 0",
            message="values must name at least one value when operator is In or NotIn",
            holds=lambda r: r.operator in ("Exists", "DoesNotExist") or bool(r.values),
            field_path=".values",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.operator in ['In', 'NotIn'] || !has(self.values) || size(self.values) == 0",
            message="values must be empty when operator is Exists or DoesNotExist",
            holds=lambda r: r.operator in ("In", "NotIn") or not r.values,
            field_path=".values",
            reason="FieldValueForbidden",
        ),
    )

    key: str = Field(description="Label key the selector applies to.", min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values."
    )
    values: list[str] | None = Field(
        default=None,
        description="Values for In and NotIn; must be empty for Exists and DoesNotExist.",
        max_length=64,
        json_schema_extra=k8s(list_type="atomic"),
    )


class LabelSelector(ApiModel):
    """A pod label selector (metav1.LabelSelector); an empty selector is refused."""

    RULES = (
        Rule(
            cel="has(self.matchLabels) && size(self.matchLabels) > 0 || "
            "has(self.matchExpressions) && size(self.matchExpressions) > 0",
            message="selector must name at least one label in matchLabels or matchExpressions; "
            "an empty selector would match every pod in the namespace",
            holds=lambda s: bool(s.match_labels) or bool(s.match_expressions),
        ),
    )

    match_labels: dict[str, str] | None = Field(
        default=None, description="Pods must carry every one of these labels."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None,
        description="Set-based requirements; all must hold.",
        max_length=32,
        json_schema_extra=k8s(list_type="atomic"),
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a pod with `labels` is selected (the apiserver's semantics)."""
        for key, value in (self.match_labels or {}).items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions or []:
            has = req.key in labels
            if (req.operator == "Exists" and not has) or (req.operator == "DoesNotExist" and has):
                return False
            if req.operator == "In" and labels.get(req.key) not in (req.values or []):
                return False
            if req.operator == "NotIn" and has and labels[req.key] in (req.values or []):
                return False
        return True

    def to_label_selector(self) -> str:
        """The selector in kubectl / list-call syntax (`a=b,c in (d,e)`)."""
        parts = [f"{k}={v}" for k, v in sorted((self.match_labels or {}).items())]
        for req in self.match_expressions or []:
            if req.operator == "Exists":
                parts.append(req.key)
            elif req.operator == "DoesNotExist":
                parts.append(f"!{req.key}")
            else:
                op = "in" if req.operator == "In" else "notin"
                parts.append(f"{req.key} {op} ({','.join(req.values or [])})")
        return ",".join(parts)


class LocalObjectReference(ApiModel):
    name: str = Field(
        description="Name of an object in the same namespace.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One observation of the object's state (metav1.Condition)."""

    type: str = Field(description="Kind of condition, e.g. Ready, Complete.", min_length=1, max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase machine-readable reason for the last transition.",
        min_length=1,
        max_length=1024,
        pattern=REASON,
    )
    message: str = Field(default="", description="Human-readable detail.", max_length=32768)
    last_transition_time: datetime = Field(
        description="When status last changed (not when the message or reason last changed)."
    )
    observed_generation: int | None = Field(
        default=None,
        description="metadata.generation that this condition was computed from.",
        ge=0,
    )


def conditions_field() -> Any:
    return Field(
        default=None,
        description="Current state, one entry per condition type.",
        max_length=16,
        json_schema_extra=k8s(list_type="map", map_keys=["type"]),
    )


def observed_generation_field() -> Any:
    return Field(
        default=None,
        description="metadata.generation most recently acted on by the operator.",
        ge=0,
    )


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """`matches` for a selector in wire form; an invalid or empty selector matches nothing."""
    try:
        sel = LabelSelector.model_validate(selector)
    except ValueError:
        return False
    if not sel.match_labels and not sel.match_expressions:
        return False
    return sel.matches(labels)
