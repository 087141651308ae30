"""ArtifactCache (`ac`): JIT compile caches made by warm pods, installed into new ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from .meta import (
    ApiModel,
    Condition,
    LabelSelector,
    Rule,
    conditions_field,
    k8s,
    observed_generation_field,
    unique,
)

CacheKind = Literal["torch-compile", "triton", "deepgemm"]
MiB = 1 << 20
GiB = 1 << 30


class CacheIdentity(ApiModel):
    """What decides whether a cache can be reused. torch-compile needs model; Triton and DeepGEMM are self-keyed."""

    model: str | None = Field(
        default=None, max_length=253, description="Model name (required for torch-compile)."
    )
    framework: str | None = Field(
        default=None, max_length=64, description="Serving framework, e.g. vllm, sglang."
    )
    framework_version: str | None = Field(
        default=None, max_length=64, description="Framework version."
    )
    torch: str | None = Field(
        default=None, max_length=64, description="torch version, e.g. 2.13.0."
    )
    cuda: str | None = Field(default=None, max_length=32, description="CUDA version, e.g. 13.0.")
    triton: str | None = Field(default=None, max_length=64, description="Triton version.")
    gpu_arch: str | None = Field(
        default=None,
        max_length=32,
        pattern=r"^sm_[0-9]+[a-z]?$",
        description="GPU architecture, e.g. sm_90.",
    )
    compile_config_digest: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256 of the compile configuration (sha256:<64 hex>).",
    )


class Trust(ApiModel):
    RULES = (
        Rule(
            cel="has(self.secretRef) || (has(self.allowUnsigned) && self.allowUnsigned)",
            message="spec.trust needs secretRef (targets verify signatures) or allowUnsigned: true "
            "(targets install unsigned caches and report Trusted=False)",
            holds=lambda t: t.secret_ref is not None or t.allow_unsigned,
            field_path=".secretRef",
            reason="FieldValueRequired",
        ),
    )

    secret_ref: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Secret holding the ed25519 public key sources sign with.",
    )
    key: str = Field(
        default="ed25519.pub", min_length=1, max_length=253, description="Key in the Secret."
    )
    required: bool = Field(
        default=True,
        description="With secretRef: refuse caches that are unsigned or wrongly signed, and give up when the key is not mounted.",
    )
    allow_unsigned: bool = Field(
        default=False,
        description="Install caches that carry no verified signature (compile caches hold .so files and Python: this trusts every source pod). Targets that install one report trusted: false. Without it, and without secretRef, targets refuse caches.",
    )


# Fields that decide whether a cache of each kind can be reused (snake_case as in
# CacheIdentity). torch.compile caches depend on everything; Triton and DeepGEMM
# caches key their entries themselves, so the model does not matter to them.
REQUIRED_IDENTITY: dict[str, tuple[str, ...]] = {
    "torch-compile": (
        "model",
        "framework",
        "framework_version",
        "torch",
        "cuda",
        "triton",
        "gpu_arch",
        "compile_config_digest",
    ),
    "triton": ("triton", "cuda", "gpu_arch"),
    "deepgemm": ("cuda", "gpu_arch"),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _has_identity(kind: str, fields: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda s: kind not in s.kinds or all(getattr(s.identity, f) is not None for f in fields)


def _identity_rules() -> tuple[Rule, ...]:
    rules = [
        Rule(
            cel="!('torch-compile' in self.kinds) || has(self.identity.model)",
            message="identity.model is required when kinds includes torch-compile (its caches are keyed by model)",
            holds=lambda s: "torch-compile" not in s.kinds or s.identity.model is not None,
            field_path=".identity.model",
            reason="FieldValueRequired",
        )
    ]
    for kind, fields in REQUIRED_IDENTITY.items():
        names = [_camel(f) for f in fields]
        rules.append(
            Rule(
                cel=f"!('{kind}' in self.kinds) || "
                + " && ".join(f"has(self.identity.{n})" for n in names),
                message=f"kinds includes {kind}: identity needs "
                + ", ".join(names)
                + " (they decide whether a cache can be reused)",
                holds=_has_identity(kind, fields),
                field_path=".identity",
                reason="FieldValueRequired",
            )
        )
    return tuple(rules)


class ArtifactCacheSpec(ApiModel):
    RULES = _identity_rules()

    identity: CacheIdentity = Field(
        description="Identity the cache must match.",
        json_schema_extra=k8s(immutable="spec.identity is immutable; create a new ArtifactCache"),
    )
    kinds: Annotated[list[CacheKind], AfterValidator(unique)] = Field(
        min_length=1,
        max_length=3,
        description="Cache kinds to carry: torch-compile, triton, deepgemm.",
        json_schema_extra=k8s(list_type="set"),
    )
    sources: LabelSelector = Field(description="Warm pods whose agents packed a cache.")
    targets: LabelSelector = Field(
        description="Pods that install the cache before their engine starts."
    )
    trust: Trust | None = Field(
        default=None,
        description="Signature checking. Unset: targets refuse every cache (set secretRef, or allowUnsigned: true to opt in to unsigned caches).",
    )
    max_bytes: int = Field(
        default=20 * GiB, ge=1 * MiB, le=1 << 40, description="Largest cache accepted, in bytes."
    )
    install_timeout_seconds: int = Field(
        default=300,
        ge=5,
        le=3600,
        description="How long a target tries before giving up and starting cold.",
    )


class CacheRef(ApiModel):
    kind: CacheKind = Field(description="Cache kind.")
    identity: str | None = Field(
        default=None, max_length=64, description="sha256 of the canonical identity."
    )
    manifest_id: str = Field(max_length=80, description="sha256 of the canonical manifest.")
    bytes: int | None = Field(default=None, ge=0, description="Bytes in the cache.")
    files: int | None = Field(default=None, ge=0, description="Files in the cache.")


class CacheMember(ApiModel):
    """One pod's entry, written only by that pod's agent (server-side apply)."""

    pod: str = Field(min_length=1, max_length=253, description="Pod name.")
    role: Literal["source", "target"] | None = Field(
        default=None, description="source: packs and serves; target: installs."
    )
    endpoint: str | None = Field(
        default=None, max_length=300, description="host:port of the agent's gRPC service."
    )
    state: Literal["Packed", "Missing", "Waiting", "Installing", "Installed", "Failed"] | None = (
        Field(
            default=None,
            description="Sources: Packed (serving) or Missing (no warm cache here). Targets: Waiting (for a source), Installing, Installed, Failed (gave up; the engine starts cold).",
        )
    )
    caches: list[CacheRef] | None = Field(
        default=None,
        max_length=3,
        description="Caches packed (sources) or installed (targets).",
        json_schema_extra=k8s(list_type="atomic"),
    )
    reason: str | None = Field(
        default=None, max_length=128, description="CamelCase reason of a failure."
    )
    message: str | None = Field(default=None, max_length=1024, description="Detail of a failure.")
    trusted: bool | None = Field(
        default=None,
        description="Targets: true when every installed cache was signed by the trusted key, false when one was accepted unsigned (spec.trust.allowUnsigned).",
    )


class InstallFailure(ApiModel):
    pod: str = Field(min_length=1, max_length=253, description="Target pod.")
    reason: str = Field(max_length=128, description="CamelCase reason.")
    message: str | None = Field(default=None, max_length=1024, description="Detail.")


class ArtifactCacheStatus(ApiModel):
    conditions: list[Condition] | None = conditions_field()
    observed_generation: int | None = observed_generation_field()
    source: str | None = Field(default=None, description="Pod serving the cache.")
    manifest_id: str | None = Field(
        default=None,
        description="sha256 of the canonical manifest (one kind), or of the kind:manifest lines of all kinds.",
    )
    caches: list[CacheRef] | None = Field(
        default=None,
        max_length=3,
        description="Per-kind caches served by the source.",
        json_schema_extra=k8s(list_type="atomic"),
    )
    bytes: int | None = Field(default=None, ge=0, description="Bytes in the cache.")
    files: int | None = Field(default=None, ge=0, description="Files in the cache.")
    trust: Literal["Signed", "Unverified", "Refused"] | None = Field(
        default=None,
        description="Signed: targets verify an ed25519 signature. Unverified: spec.trust.allowUnsigned, targets install unsigned caches. Refused: no spec.trust, targets refuse caches.",
    )
    installed: int | None = Field(
        default=None, ge=0, description="Target pods with the cache installed."
    )
    targets: int | None = Field(default=None, ge=0, description="Target pods selected.")
    failures: list[InstallFailure] | None = Field(
        default=None,
        description="Targets that gave up (compact, at most 20), keyed by pod.",
        max_length=1000,
        json_schema_extra=k8s(list_type="map", map_keys=["pod"]),
    )
    members: list[CacheMember] | None = Field(
        default=None,
        description="Per-pod entries, keyed by pod; each agent writes only its own.",
        max_length=4096,
        json_schema_extra=k8s(list_type="map", map_keys=["pod"]),
    )


class ArtifactCache(ApiModel):
    """JIT compile caches made by warm pods and installed into new ones before their engine starts."""

    KIND: ClassVar[str] = "ArtifactCache"
    PLURAL: ClassVar[str] = "artifactcaches"
    SHORT_NAMES: ClassVar[list[str]] = ["ac"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, object]]] = [
        {"name": "Kinds", "type": "string", "jsonPath": ".spec.kinds"},
        {"name": "Manifest", "type": "string", "jsonPath": ".status.manifestId", "priority": 1},
        {"name": "Installed", "type": "integer", "jsonPath": ".status.installed"},
        {"name": "Trust", "type": "string", "jsonPath": ".status.trust"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    spec: ArtifactCacheSpec
    status: ArtifactCacheStatus | None = None


def combined_manifest_id(caches: Sequence[CacheRef | Mapping[str, Any]]) -> str:
    """status.manifestId: one kind's manifest id, or sha256 of the sorted `kind:manifestId` lines.
    `caches` as models or in wire form (an agent's member entry)."""
    import hashlib

    pairs = [
        (c.kind, c.manifest_id)
        if isinstance(c, CacheRef)
        else (str(c["kind"]), str(c["manifestId"]))
        for c in caches
    ]
    if len(pairs) == 1:
        return pairs[0][1]
    lines = "".join(f"{kind}:{mid}\n" for kind, mid in sorted(pairs, key=lambda p: p[0]))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
