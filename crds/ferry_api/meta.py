"""Types shared by the three kinds: base model config, selectors, conditions.

Field names are camelCase on the wire (Kubernetes convention) and snake_case
in Python; `model_dump(by_alias=True)` gives the wire form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

# Kubernetes object names (RFC 1123 subdomain) and label values.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Condition reasons are CamelCase identifiers (metav1.Condition).
REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
# Label syntax (k8s.io/apimachinery validation): a value is empty or up to 63 letters,
# digits, '-', '_', '.', starting and ending with a letter or digit; a key is that
# (non-empty) name, optionally after a DNS-subdomain prefix of at most 253 and a '/'.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_KEY_HELP = (
    "a label key is a name of at most 63 letters, digits, '-', '_' or '.', starting "
    "and ending with a letter or digit, optionally after a lowercase DNS prefix "
    "of at most 253 characters and a '/' (e.g. app or ferry.dev/role)"
)
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


def label_key_ok(key: str) -> bool:
    """The Python twin of label_key_cel."""
    return re.match(LABEL_KEY, key) is not None and key.find("/") <= 253


def check_label_keys(keys: Any) -> None:
    bad = [k for k in keys if not label_key_ok(k)]
    if bad:
        raise ValueError("'" + "', '".join(bad) + f"' is not a label key: {LABEL_KEY_HELP}")


def label_key_cel(var: str) -> str:
    """CEL: the string `var` is a label key (label_key_ok)."""
    regex = LABEL_KEY.replace("\\", "\\\\")
    return f"{var}.matches('{regex}') && (!{var}.contains('/') || {var}.indexOf('/') <= 253)"


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

    @classmethod
    def lenient(cls, obj: Any) -> Lenient:
        """`obj` read as from_wire does, leaving out what cannot be read instead of
        failing: unknown fields (a newer writer's), fields or list items with a bad
        value, an item lacking a required field; the result names which. Its model is
        None when the object itself lacks a required field (or is not an object). For
        entries other writers own (an agent's member entry), so that one entry does not
        fail a whole status."""
        data = _prune_nulls(obj)
        try:  # the common case, without the JSON round trip (3x slower)
            return Lenient(cls.model_validate(data, strict=True), [], [])
        except ValidationError:
            pass
        unknown: list[str] = []
        bad: list[str] = []
        for _ in range(8):
            if not isinstance(data, dict):
                break
            try:
                wire = json.dumps(data, default=str)  # as the apiserver's JSON: a time is a string
                return Lenient(cls.model_validate_json(wire, strict=True), unknown, bad)
            except ValidationError as exc:
                errors = [
                    (e["type"], tuple(e["loc"][:-1] if e["type"] == "missing" else e["loc"]))
                    for e in exc.errors()
                ]
                if any(not path for _, path in errors):
                    break
                marked = [(kind, path) for kind, path in errors if _mark(data, path)]
                if not marked:
                    break
                for kind, path in marked:
                    (unknown if kind == "extra_forbidden" else bad).append(".".join(map(str, path)))
                data = _unmarked(data)
        return Lenient(None, unknown, bad)


class Lenient(NamedTuple):
    """What ApiModel.lenient read: the model (None: unreadable), and the dotted paths
    it left out, unknown fields apart from bad values."""

    model: Any
    unknown: list[str]
    bad: list[str]


_DROPPED = object()


def _mark(data: Any, path: tuple[Any, ...]) -> bool:
    """Replace the value at `path` with _DROPPED; False when there is none."""
    *parents, last = path
    for key in parents:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return False
    try:
        data[last]
    except (KeyError, IndexError, TypeError):
        return False
    data[last] = _DROPPED
    return True


def _unmarked(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _unmarked(v) for k, v in obj.items() if v is not _DROPPED}
    if isinstance(obj, list):
        return [_unmarked(v) for v in obj if v is not _DROPPED]
    return obj


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

    key: str = Field(
        description="Label key the selector applies to.",
        min_length=1,
        max_length=317,
        json_schema_extra=k8s(
            validations=[
                {
                    "rule": label_key_cel("self"),
                    "message": f"key must be a label key: {LABEL_KEY_HELP}",
                    "messageExpression": f'"\'" + self + "\' is not a label key: {LABEL_KEY_HELP}"',
                }
            ]
        ),
    )
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values."
    )
    values: list[LabelValue] | None = Field(
        default=None,
        description="Values for In and NotIn; must be empty for Exists and DoesNotExist.",
        max_length=64,
        json_schema_extra=k8s(list_type="atomic"),
    )

    @field_validator("key")
    @classmethod
    def _key_is_a_label_key(cls, key: str) -> str:
        check_label_keys([key])
        return key


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

    match_labels: dict[str, LabelValue] | None = Field(
        default=None,
        description="Pods must carry every one of these labels.",
        max_length=64,
        json_schema_extra=k8s(
            validations=[
                {
                    "rule": f"self.all(k, {label_key_cel('k')})",
                    "message": f"every key must be a label key: {LABEL_KEY_HELP}",
                    "messageExpression": '"\'" + self.filter(k, !('
                    + label_key_cel("k")
                    + "))[0] + "
                    f'"\' is not a label key: {LABEL_KEY_HELP}"',
                }
            ]
        ),
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None,
        description="Set-based requirements; all must hold.",
        max_length=32,
        json_schema_extra=k8s(list_type="atomic"),
    )

    @field_validator("match_labels")
    @classmethod
    def _keys_are_label_keys(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        check_label_keys(labels or {})
        return labels

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

    type: str = Field(
        description="Kind of condition, e.g. Ready, Complete.", min_length=1, max_length=316
    )
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
    from .times import now as now_

    return now_()


def find_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    """The condition of `type_` in a wire-form list (an object's status.conditions)."""
    return next(
        (c for c in conditions or [] if isinstance(c, dict) and c.get("type") == type_), None
    )


def condition_is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    c = find_condition(conditions, type_)
    return c is not None and c.get("status") == "True"


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """`matches` for a selector in wire form; an invalid or empty selector matches nothing."""
    try:
        sel = LabelSelector.model_validate(selector)
    except ValueError:
        return False
    if not sel.match_labels and not sel.match_expressions:
        return False
    return sel.matches(labels)
