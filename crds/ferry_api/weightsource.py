"""WeightSource (`ws`): pods that hold one model's weights and serve them to peers."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .meta import (
    ApiModel,
    Condition,
    LabelSelector,
    Rule,
    conditions_field,
    k8s,
    observed_generation_field,
)

Dtype = Literal["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"]
MemoryMode = Literal["cuda", "host"]
RailsMode = Literal["auto", "stripe", "off", "explicit"]
ReplicaState = Literal["Loading", "Ready", "NoVersion", "Failed", "Stale", "Mismatched"]


class ModelRef(ApiModel):
    name: str = Field(
        description="Model name, e.g. meta-llama/Llama-3.1-8B. Immutable: a new model is a new WeightSource.",
        min_length=1,
        max_length=253,
        json_schema_extra=k8s(
            immutable="spec.model.name is immutable; create a new WeightSource for another model"
        ),
    )
    revision: str | None = Field(
        default=None,
        description="Revision or checkpoint the replicas were loaded from (informational).",
        max_length=128,
    )


class Layout(ApiModel):
    RULES = (
        Rule(
            cel="self.tensorParallelSize % self.ranksPerPod == 0",
            message="layout.ranksPerPod must divide layout.tensorParallelSize (each pod holds ranksPerPod "
            "consecutive ranks): set ranksPerPod to a divisor, e.g. tensorParallelSize: 2 with ranksPerPod: 2 "
            "for TP 2 inside one pod",
            holds=lambda lay: lay.tensor_parallel_size % lay.ranks_per_pod == 0,
            field_path=".ranksPerPod",
        ),
    )

    dtype: Dtype = Field(default="bfloat16", description="Element type the weights are held in.")
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Number of tensor-parallel ranks the weights are split over.",
    )
    rank_label: str = Field(
        default="ferry.dev/tp-rank",
        min_length=1,
        max_length=317,
        description="Pod label holding each replica's pod rank (0-based): its tensor-parallel rank, or with "
        "ranksPerPod k > 1 the index of its group of k ranks. Not needed when ranksPerPod equals tensorParallelSize.",
    )
    ranks_per_pod: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Tensor-parallel ranks each pod holds, one per GPU (its agent's local ranks: ferry agent run "
        "--devices 0,1). Local rank l of the pod with pod rank p holds global rank p * ranksPerPod + l.",
    )
    quantization: Literal["none", "fp8-block"] = Field(
        default="none", description="Quantization of the weights as served."
    )


class Rails(ApiModel):
    """How the agent pins UCX to RDMA NICs (UCX_NET_DEVICES) before creating its NIXL agent."""

    RULES = (
        Rule(
            cel="self.mode != 'explicit' || has(self.devices) && size(self.devices) > 0",
            message="rails.devices is required when rails.mode is explicit: map each GPU index to its NICs",
            holds=lambda r: r.mode != "explicit" or bool(r.devices),
            field_path=".devices",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.mode == 'explicit' || !has(self.devices)",
            message="rails.devices is only allowed with rails.mode explicit; remove it or set mode: explicit",
            holds=lambda r: r.mode == "explicit" or r.devices is None,
            field_path=".devices",
            reason="FieldValueForbidden",
        ),
    )

    mode: RailsMode = Field(
        default="auto",
        description="auto: closest ACTIVE NIC per GPU; stripe: several NICs per GPU; off: leave UCX alone; explicit: use devices.",
    )
    devices: dict[str, list[str]] | None = Field(
        default=None,
        description="Explicit map from GPU index (as a string) to UCX device names such as mlx5_0:1.",
        max_length=64,
    )


class Heartbeat(ApiModel):
    RULES = (
        Rule(
            cel="self.renewIntervalSeconds < self.leaseDurationSeconds",
            message="heartbeat.renewIntervalSeconds must be below leaseDurationSeconds, or the lease expires between renewals",
            holds=lambda h: h.renew_interval_seconds < h.lease_duration_seconds,
            field_path=".renewIntervalSeconds",
        ),
    )

    lease_duration_seconds: int = Field(
        default=15, ge=3, le=300, description="A replica whose Lease is older than this is Stale."
    )
    renew_interval_seconds: int = Field(
        default=5, ge=1, le=100, description="How often each agent renews its Lease."
    )


class WeightSourceSpec(ApiModel):
    model: ModelRef = Field(description="The model these weights belong to.")
    selector: LabelSelector = Field(
        description="Pods (with the Ferry agent) that hold the weights."
    )
    layout: Layout = Field(
        default_factory=Layout,
        description="How the weights are laid out across replicas.",
        json_schema_extra=k8s(default={}),
    )
    memory: MemoryMode = Field(default="cuda", description="Where the agents hold the weights.")
    rails: Rails = Field(
        default_factory=Rails,
        description="UCX NIC pinning.",
        json_schema_extra=k8s(default={}),
    )
    heartbeat: Heartbeat = Field(
        default_factory=Heartbeat,
        description="Agent liveness (coordination.k8s.io Lease).",
        json_schema_extra=k8s(default={}),
    )


class RankStatus(ApiModel):
    """A local rank of a pod that differs from its pod's entry (not Ready, or another
    version): listed only then, so an entry stays one line per pod."""

    local_rank: int = Field(
        ge=0, le=63, description="Local rank (GPU index within the pod's agent)."
    )
    rank: int | None = Field(
        default=None, ge=0, description="Global tensor-parallel rank it holds."
    )
    state: ReplicaState | None = Field(default=None, description="This rank's state.")
    version: str | None = Field(
        default=None, description="Version this rank serves.", max_length=128
    )
    reason: str | None = Field(
        default=None, description="Why it is not Ready (e.g. LayoutTooLarge).", max_length=128
    )
    message: str | None = Field(default=None, description="Detail of the failure.", max_length=256)


class ReplicaStatus(ApiModel):
    """One replica's entry, written only by that replica's agent (server-side apply)."""

    pod: str = Field(description="Pod name.", min_length=1, max_length=253)
    node: str | None = Field(default=None, description="Node the pod runs on.", max_length=253)
    endpoint: str | None = Field(
        default=None, description="host:port of the agent's gRPC service.", max_length=300
    )
    rank: int | None = Field(
        default=None,
        ge=0,
        description="Pod rank (its rank label): the tensor-parallel rank of a one-rank pod.",
    )
    local_ranks: int | None = Field(
        default=None, ge=1, le=64, description="Local ranks the pod's agent serves (unset: 1)."
    )
    version: str | None = Field(
        default=None, description="Version the replica serves.", max_length=128
    )
    fingerprint: str | None = Field(
        default=None,
        description="Hash of tensor names, dtypes and shapes; for several local ranks, combined over its global "
        "ranks (tp<n>:...).",
        max_length=80,
    )
    digest: str | None = Field(
        default=None,
        description="Content digest of the version served (sha256 over its per-tensor digests).",
        max_length=80,
    )
    tensors: int | None = Field(
        default=None, ge=0, description="Number of tensors (all its local ranks)."
    )
    bytes: int | None = Field(
        default=None, ge=0, description="Bytes of weights held (all its local ranks)."
    )
    state: ReplicaState | None = Field(
        default=None,
        description="Loading, Ready, NoVersion (a pull failed after writing: the weights are partial and not served until a pull succeeds), Failed (a local rank's slabs failed: ranks names it), Stale (Lease expired or agent shut down) or Mismatched (fingerprint or local ranks differ from the others).",
    )
    reason: str | None = Field(
        default=None,
        description="Why the replica is NoVersion or Failed: the failed pull's or rank's reason (e.g. VersionChanged).",
        max_length=128,
    )
    ranks: list[RankStatus] | None = Field(
        default=None,
        description="Local ranks that differ from this entry (not Ready, or another version), keyed by localRank; "
        "absent while every local rank agrees.",
        max_length=64,
        json_schema_extra=k8s(list_type="map", map_keys=["localRank"]),
    )


class WeightSourceStatus(ApiModel):
    conditions: list[Condition] | None = conditions_field()
    observed_generation: int | None = observed_generation_field()
    version: str | None = Field(default=None, description="Version served by the ready replicas.")
    fingerprint: str | None = Field(
        default=None, description="Layout fingerprint of the ready replicas."
    )
    digest: str | None = Field(
        default=None,
        description="Content digest of the served version (what its ready replicas report; targets check their bytes against the source's per-tensor digests before serving).",
        max_length=80,
    )
    tensors: int | None = Field(default=None, ge=0, description="Number of tensors per replica.")
    bytes: int | None = Field(default=None, ge=0, description="Bytes of weights per replica.")
    size: str | None = Field(default=None, description="bytes in human units, for kubectl.")
    replicas: int | None = Field(default=None, ge=0, description="Pods selected.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Replicas Ready to serve.")
    ready_summary: str | None = Field(
        default=None, description="readyReplicas/replicas, for kubectl."
    )
    members: list[ReplicaStatus] | None = Field(
        default=None,
        description="Compact per-replica entries, keyed by pod; each agent writes only its own.",
        max_length=4096,
        json_schema_extra=k8s(list_type="map", map_keys=["pod"]),
    )


class WeightSource(ApiModel):
    """A set of pods holding one model's weights in GPU or host memory, serving them to peers."""

    KIND: ClassVar[str] = "WeightSource"
    PLURAL: ClassVar[str] = "weightsources"
    SHORT_NAMES: ClassVar[list[str]] = ["ws"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, object]]] = [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
        {"name": "Version", "type": "string", "jsonPath": ".status.version"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.readySummary"},
        {"name": "Size", "type": "string", "jsonPath": ".status.size"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    spec: WeightSourceSpec
    status: WeightSourceStatus | None = None
