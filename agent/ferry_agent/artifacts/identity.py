"""Cache identity: the fields that decide whether a compiled cache can be reused.

A cache built for one (torch, CUDA, Triton, GPU arch, ...) must never be
installed into a pod that differs in any of them, so the identity is hashed
canonically and the hash is what sources publish and targets ask for.

Triton and DeepGEMM caches are self-keyed (every kernel directory is named by
a hash of its source and options), so a model name is optional for them; a
torch.compile (Inductor) cache is keyed per model graph and requires it.
Optional fields, when set, are part of the hash like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

from ferry_agent.artifacts.errors import IdentityError, MissingIdentityField

FIELDS: tuple[str, ...] = (
    "model",
    "framework",
    "framework_version",
    "torch",
    "cuda",
    "triton",
    "gpu_arch",
    "compile_config_digest",
)

REQUIRED: dict[str, tuple[str, ...]] = {
    "torch-compile": FIELDS,
    "triton": ("triton", "cuda", "gpu_arch"),
    "deepgemm": ("cuda", "gpu_arch"),
}

KINDS: tuple[str, ...] = tuple(REQUIRED)

_ARCH = re.compile(r"^(?:sm_?|compute_?)?(\d+)(?:\.(\d+))?([a-z]?)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def normalize_gpu_arch(value: str) -> str:
    """`9.0`, `90`, `sm90`, `SM_90` -> `sm_90`; `sm_90a` keeps its suffix."""
    m = _ARCH.match(value.strip().lower())
    if not m:
        raise IdentityError(f"gpu_arch {value!r} is not like 'sm_90', '9.0' or '90'")
    major, minor, suffix = m.groups()
    digits = major + minor if minor is not None else major
    if len(digits) < 2:
        raise IdentityError(f"gpu_arch {value!r} needs major and minor, like '8.0'")
    return f"sm_{digits}{suffix}"


def _normalize(field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise IdentityError(
            f"identity field {field!r} must be a string, got {type(value).__name__}"
        )
    v = value.strip()
    if not v:
        return None
    if field == "gpu_arch":
        return normalize_gpu_arch(v)
    if field == "framework":
        return v.lower()
    if field == "compile_config_digest":
        v = v.lower().removeprefix("sha256:")
        if not _SHA256.match(v):
            raise IdentityError(f"compile_config_digest {value!r} must be a sha256 hex digest")
        return f"sha256:{v}"
    if field in ("framework_version", "torch", "cuda", "triton"):
        # A leading "v" is cosmetic; local version labels like "+cu124" are not.
        return v[1:] if v[:1] in ("v", "V") and v[1:2].isdigit() else v
    return v


@dataclass(frozen=True)
class Identity:
    """A validated, normalized identity of one cache kind."""

    kind: str
    fields: tuple[tuple[str, str], ...]

    @classmethod
    def build(cls, kind: str, values: Mapping[str, object] | None = None, **kw: object) -> Identity:
        merged: dict[str, object] = dict(values or {})
        merged.update(kw)
        if kind not in REQUIRED:
            raise IdentityError(f"unknown cache kind {kind!r}; expected one of {', '.join(KINDS)}")
        unknown = sorted(set(merged) - set(FIELDS))
        if unknown:
            raise IdentityError(
                f"unknown identity field {unknown[0]!r}; known: {', '.join(FIELDS)}"
            )
        norm = {k: _normalize(k, v) for k, v in merged.items()}
        for field in REQUIRED[kind]:
            if norm.get(field) is None:
                raise MissingIdentityField(kind, field)
        items = tuple(sorted((k, v) for k, v in norm.items() if v is not None))
        return cls(kind=kind, fields=items)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Identity:
        """Inverse of `to_dict`: `{"kind": ..., "fields": {...}}`."""
        if not isinstance(data, Mapping) or set(data) != {"kind", "fields"}:
            raise IdentityError("identity must be an object with exactly 'kind' and 'fields'")
        kind, fields = data["kind"], data["fields"]
        if not isinstance(kind, str) or not isinstance(fields, Mapping):
            raise IdentityError("identity 'kind' must be a string and 'fields' an object")
        return cls.build(kind, fields)

    def get(self, field: str) -> str | None:
        return dict(self.fields).get(field)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "fields": dict(self.fields)}

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def hash(self) -> str:
        """sha256 hex of the canonical JSON; what sources publish and targets request."""
        return hashlib.sha256(self.canonical()).hexdigest()


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def detect_environment(use_torch: bool = True) -> dict[str, str]:
    """Best-effort identity fields of this process's environment.

    Never raises: on a CPU-only machine, or without torch, the fields that
    cannot be found are simply absent, and `detect_identity` then names the
    first one its kind requires.
    """
    found: dict[str, str] = {}
    torch_version = _version("torch")
    if torch_version:
        found["torch"] = torch_version
    triton_version = _version("triton") or _version("pytorch-triton")
    if triton_version:
        found["triton"] = triton_version
    if use_torch and torch_version:
        try:
            import torch  # noqa: PLC0415 - heavy; only when asked

            if torch.version.cuda:
                found["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                found["gpu_arch"] = f"sm_{major}{minor}"
        except Exception:  # noqa: BLE001 - a broken torch must not stop detection
            pass
    if "cuda" not in found and os.environ.get("CUDA_VERSION"):
        found["cuda"] = os.environ["CUDA_VERSION"]
    if "gpu_arch" not in found:
        cap = _run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
        if cap:
            try:
                found["gpu_arch"] = normalize_gpu_arch(cap.splitlines()[0])
            except IdentityError:
                pass
    return found


def detect_identity(kind: str, use_torch: bool = True, **given: str | None) -> Identity:
    """Identity of `kind` from the local environment; explicit values win.

    Raises `MissingIdentityField` naming the first required field that was
    neither given nor detected (e.g. `gpu_arch` on a CPU-only node).
    """
    values: dict[str, object] = dict(detect_environment(use_torch))
    values.update({k: v for k, v in given.items() if v is not None})
    return Identity.build(kind, values)
