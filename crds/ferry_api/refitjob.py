"""RefitJob (`rj`): move one version of a WeightSource into a set of target pods."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from .meta import (
    ApiModel,
    Condition,
    LabelSelector,
    LocalObjectReference,
    Rule,
    conditions_field,
    k8s,
    observed_generation_field,
)

MiB = 1 << 20
GiB = 1 << 30

StrategyType = Literal["direct", "tree", "chain"]
TransformType = Literal["none", "fp8-block", "reshard"]
PauseMode = Literal["engine", "doubleBuffer", "none"]
JobPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Following"]
# spec.version of a continuous refit: the targets follow the source's newest version
FOLLOW = "follow"
TargetPhase = Literal["Pending", "Assigned", "Pulling", "Done", "Failed", "Left"]


class Strategy(ApiModel):
    RULES = (
        Rule(
            cel="self.type == 'direct' || self.parallelSources == 1",
            message="strategy.parallelSources above 1 needs strategy.type direct: tree and chain relay from one upstream per target",
            holds=lambda s: s.type == "direct" or s.parallel_sources == 1,
            field_path=".parallelSources",
        ),
    )

    type: StrategyType = Field(
        default="direct",
        description="direct: every target pulls from ready sources; tree: finished targets serve others; chain: chunk-pipelined relay.",
    )
    max_fan_out: int = Field(
        default=4, ge=1, le=64, description="Most targets one source serves at a time."
    )
    chunk_bytes: int = Field(
        default=64 * MiB,
        ge=1 * MiB,
        le=4 * GiB,
        description="Transfer chunk size in bytes; chain relays forward whole chunks.",
    )
    parallel_sources: int = Field(
        default=1, ge=1, le=16, description="Sources each target stripes its pull across."
    )


class Transform(ApiModel):
    RULES = (
        Rule(
            cel="self.type != 'reshard' || has(self.targetTensorParallelSize)",
            message="transform.targetTensorParallelSize is required when transform.type is reshard",
            holds=lambda t: t.type != "reshard" or t.target_tensor_parallel_size is not None,
            field_path=".targetTensorParallelSize",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.type == 'reshard' || !has(self.targetTensorParallelSize)",
            message="transform.targetTensorParallelSize is only allowed when transform.type is reshard",
            holds=lambda t: t.type == "reshard" or t.target_tensor_parallel_size is None,
            field_path=".targetTensorParallelSize",
            reason="FieldValueForbidden",
        ),
    )

    type: TransformType = Field(
        default="none",
        description="none; fp8-block: source serves e4m3 with block scales; reshard: change tensor-parallel size.",
    )
    target_tensor_parallel_size: int | None = Field(
        default=None, ge=1, le=64, description="Tensor-parallel size of the targets (reshard only)."
    )
    block_size: int = Field(
        default=128, ge=16, le=1024, description="Square block edge for fp8-block scales."
    )


class Pause(ApiModel):
    mode: PauseMode = Field(
        default="engine",
        description="engine: ask the engine to pause and wait for its acknowledgement (a pull that fails after writing leaves the target with no version until a pull succeeds); doubleBuffer: pull into a second slab set and swap (a failed pull leaves the old version served; recommended for serving pods, at one more copy of the weights per GPU); none: targets are not serving.",
    )
    timeout_seconds: int = Field(
        default=30,
        ge=1,
        le=600,
        description="How long an engine may take to acknowledge; beyond it the target fails with EngineNotQuiesced.",
    )


class RefitJobSpec(ApiModel):
    # A reshard target builds its own shard from one replica of every source rank: no
    # relays (tree, chain), and it writes the active slabs (no double buffer).
    RULES = (
        Rule(
            cel="self.transform.type != 'reshard' || self.strategy.type == 'direct'",
            message="spec.transform.type reshard needs spec.strategy.type direct: each target builds "
            "its own shard from every source rank, so targets cannot relay (tree, chain); set "
            "strategy.type: direct",
            holds=lambda s: s.transform.type != "reshard" or s.strategy.type == "direct",
            field_path=".strategy.type",
        ),
        Rule(
            cel="self.transform.type != 'reshard' || self.pause.mode != 'doubleBuffer'",
            message="spec.transform.type reshard cannot use spec.pause.mode doubleBuffer (the reshard "
            "writes the slabs the engine maps); set pause.mode: engine, or none for targets that "
            "are not serving",
            holds=lambda s: s.transform.type != "reshard" or s.pause.mode != "doubleBuffer",
            field_path=".pause.mode",
        ),
        Rule(
            cel="!has(self.targetRanksPerPod) || self.transform.type != 'reshard' "
            "|| !has(self.transform.targetTensorParallelSize) "
            "|| self.transform.targetTensorParallelSize % self.targetRanksPerPod == 0",
            message="spec.targetRanksPerPod must divide spec.transform.targetTensorParallelSize (each target pod "
            "holds targetRanksPerPod consecutive ranks): set it to a divisor, or leave it unset for one rank per pod",
            holds=lambda s: (
                s.target_ranks_per_pod is None
                or s.transform.type != "reshard"
                or s.transform.target_tensor_parallel_size is None
                or s.transform.target_tensor_parallel_size % s.target_ranks_per_pod == 0
            ),
            field_path=".targetRanksPerPod",
        ),
        Rule(
            cel="self.version != 'follow' || self.transform.type != 'reshard'",
            message="spec.version follow cannot use spec.transform.type reshard: a following target "
            "pulls each new version from one source or upstream; use a one-shot RefitJob per "
            "version for a reshard, or set transform.type: none",
            holds=lambda s: s.version != FOLLOW or s.transform.type != "reshard",
            field_path=".transform.type",
        ),
    )

    source_ref: LocalObjectReference = Field(
        description="The WeightSource to copy from (same namespace).",
        json_schema_extra=k8s(immutable="spec.sourceRef is immutable; create a new RefitJob"),
    )
    version: str = Field(
        default="latest",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$",
        description="Version to move; latest resolves at creation to the source's current version "
        "(status.version); follow keeps the targets on the source's newest version, agent to agent, "
        "until the job is deleted (continuous refit: phase Following, condition Synced).",
        json_schema_extra=k8s(immutable="spec.version is immutable; create a new RefitJob"),
    )
    targets: LabelSelector = Field(
        description="Pods (with the Ferry agent) that receive the weights.",
        json_schema_extra=k8s(immutable="spec.targets is immutable; create a new RefitJob"),
    )
    target_ranks_per_pod: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Tensor-parallel ranks each target pod holds, one per GPU (its agent's local ranks: "
        "--devices 0,1). Local rank l of the target with rank label p holds global rank p * targetRanksPerPod + l "
        "and pulls from the source rank with the same global rank (or, for reshard, builds that rank's shard). "
        "Unset: the WeightSource's spec.layout.ranksPerPod (transform none, fp8-block), 1 (reshard).",
    )
    strategy: Strategy = Field(
        default_factory=Strategy,
        description="Fan-out and chunking.",
        json_schema_extra=k8s(
            default={}, immutable="spec.strategy is immutable; create a new RefitJob"
        ),
    )
    transform: Transform = Field(
        default_factory=Transform,
        description="Transform applied between source and target.",
        json_schema_extra=k8s(
            default={}, immutable="spec.transform is immutable; create a new RefitJob"
        ),
    )
    pause: Pause = Field(
        default_factory=Pause,
        description="How target engines are quiesced.",
        json_schema_extra=k8s(default={}),
    )
    verify: Literal["full", "sampled", "off"] | None = Field(
        default=None,
        description="How targets check the bytes they pulled against the source's content digests before serving them: full (every byte), sampled (an eighth of the pieces per pull, a different eighth each time), off. Unset: sampled. A mismatch fails the attempt with DigestMismatch and retries on another source.",
    )
    timeout_seconds: int = Field(
        default=600,
        ge=1,
        le=86400,
        description="Deadline for the whole job from its start; beyond it the job fails with DeadlineExceeded.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Retries per target, each on another source when one exists.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=30 * 86400,
        description="Delete the job this long after it finishes; unset keeps it.",
    )


class TargetStatus(ApiModel):
    """One target's entry, written by the operator: the assignment (`source`, `attempts`)
    and, folded from the report the target's agent writes on its own Lease, how the
    current attempt goes."""

    pod: str = Field(description="Target pod name.", min_length=1, max_length=253)
    source: str | None = Field(
        default=None,
        description="Pod (or pods, comma-separated) it pulls from; with ranks inside pods, pod/localRank "
        "addresses, one group per target local rank, groups separated by | (ferry_api.ranks).",
        max_length=4096,
    )
    attempts: int | None = Field(
        default=None, ge=0, description="Attempts assigned so far (operator)."
    )
    phase: TargetPhase | None = Field(
        default=None,
        description="Of the current attempt: Pulling, Done or Failed; unset: assigned, not started. "
        "Left: the pod is gone or no longer selected, and the job completes without it (reason PodGone or PodDeleted).",
    )
    bytes: int | None = Field(default=None, ge=0, description="Bytes pulled so far.")
    reason: str | None = Field(
        default=None,
        description="CamelCase reason of the last failure (kept while a retry is assigned).",
        max_length=128,
    )
    message: str | None = Field(
        default=None, description="Detail of the last failure.", max_length=1024
    )
    seconds: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Duration of the successful pull."
    )
    endpoint: str | None = Field(
        default=None,
        max_length=300,
        description="host:port the target serves from once it reported (a downstream's assignment carries it).",
    )
    version: str | None = Field(
        default=None,
        description="version: follow: the version the target serves (reported).",
        max_length=128,
    )
    last_refit_time: datetime | None = Field(
        default=None,
        description="version: follow: when the target last served a new version (reported).",
    )


class RefitJobStatus(ApiModel):
    conditions: list[Condition] | None = conditions_field()
    observed_generation: int | None = observed_generation_field()
    phase: JobPhase | None = Field(
        default=None,
        description="Pending, Running, Succeeded or Failed; Following for version: follow.",
    )
    version: str | None = Field(
        default=None,
        description="The resolved version being moved (follow: the source's newest version).",
    )
    fingerprint: str | None = Field(default=None, description="Layout fingerprint of the source.")
    start_time: datetime | None = Field(default=None, description="When the job started.")
    completion_time: datetime | None = Field(default=None, description="When the job finished.")
    bytes_total: int | None = Field(default=None, ge=0, description="Bytes to move, all targets.")
    bytes_done: int | None = Field(default=None, ge=0, description="Bytes moved, all targets.")
    throughput: str | None = Field(default=None, description="Aggregate throughput, e.g. 12.3GB/s.")
    targets_summary: str | None = Field(
        default=None, description="done/total targets, for kubectl."
    )
    targets: list[TargetStatus] | None = Field(
        default=None,
        description="Compact per-target entries, keyed by pod.",
        max_length=10000,
        json_schema_extra=k8s(list_type="map", map_keys=["pod"]),
    )


class RefitJob(ApiModel):
    """Move one version of a WeightSource into a set of target pods (cold-start load or RL refit)."""

    KIND: ClassVar[str] = "RefitJob"
    PLURAL: ClassVar[str] = "refitjobs"
    SHORT_NAMES: ClassVar[list[str]] = ["rj"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, object]]] = [
        {"name": "Source", "type": "string", "jsonPath": ".spec.sourceRef.name"},
        {"name": "Version", "type": "string", "jsonPath": ".status.version"},
        {"name": "Targets", "type": "string", "jsonPath": ".status.targetsSummary"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Throughput", "type": "string", "jsonPath": ".status.throughput"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    spec: RefitJobSpec
    status: RefitJobStatus | None = None
