"""Whole objects as a client reads them: metadata, and spec and status as the API models.

The kind models forbid unknown fields (they generate the CRD schema and refuse a
typo in a spec). A client reading from the apiserver must not fail on a field a
newer operator added, so `read` first keeps only the fields these models know
(`known`), then validates. What the apiserver serves already passed the CRD
schema; a value these models refuse raises `ObjectInvalid` naming the object and
the field.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .meta import Condition

Spec = TypeVar("Spec", bound=BaseModel)
Status = TypeVar("Status", bound=BaseModel)


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta Ferry's clients read."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    name: str = ""
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ObjectInvalid(ValueError):
    """An object these models refuse; the message names the object and the field."""


@dataclass(frozen=True)
class Object(Generic[Spec, Status]):
    meta: ObjectMeta
    spec: Spec
    status: Status  # an empty status model when the object has none yet

    @property
    def name(self) -> str:
        return self.meta.name


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    """X for X; each member for a union (X | None)."""
    return (
        get_args(annotation)
        if get_origin(annotation) in (Union, types.UnionType)
        else (annotation,)
    )


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The model classes a field's annotation holds directly (X, X | None)."""
    return [
        a for a in _alternatives(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
    ]


def _known_value(annotation: Any, value: Any) -> Any:
    for model in _models(annotation):
        if isinstance(value, Mapping):
            return known(model, value)
    for alt in _alternatives(annotation):
        origin, args = get_origin(alt), get_args(alt)
        if origin is list and isinstance(value, list):
            return [_known_value(args[0], v) for v in value]
        if origin is dict and isinstance(value, Mapping):
            return {k: _known_value(args[1], v) for k, v in value.items()}
    return value


def known(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` (wire form) with only the fields `model` (and its nested models) declare."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    return {
        k: _known_value(fields[k].annotation, v)
        for k, v in data.items()
        if k in fields and v is not None
    }


def read(kind: Any, obj: Mapping[str, Any]) -> Object[Any, Any]:
    """`obj` (as the apiserver serves it) of `kind` (WeightSource, RefitJob, ArtifactCache)."""
    spec_model = kind.model_fields["spec"].annotation
    status_model = _models(kind.model_fields["status"].annotation)[0]
    meta = ObjectMeta.model_validate(obj.get("metadata") or {})
    spec = _validate(kind, meta, "spec", spec_model, obj)
    status = _validate(kind, meta, "status", status_model, obj)
    return Object(meta, spec, status)


def _validate(
    kind: Any, meta: ObjectMeta, part: str, model: type[BaseModel], obj: Mapping[str, Any]
) -> Any:
    try:
        return model.model_validate(known(model, obj.get(part) or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ObjectInvalid(
            f"{kind.KIND.lower()} {meta.name!r}: {part}.{where}: {first['msg']}"
        ) from None


def condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    """The condition of `type_` in a status model's conditions (meta.find_condition: wire form)."""
    return next((c for c in conditions or [] if c.type == type_), None)


def is_true(conditions: list[Condition] | None, type_: str) -> bool:
    c = condition(conditions, type_)
    return c is not None and c.status == "True"
