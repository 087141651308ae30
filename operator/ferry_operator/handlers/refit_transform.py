"""RefitJob transforms and tensor-parallel sources (pure): what a job may do with its
WeightSource, each target's rank, and which source replicas serve which target.

- transform none (or fp8-block) from a TP 1 source: any ready replica serves any
  target (planner.plan).
- transform none (or fp8-block) from a TP S > 1 source: a target holds one rank's
  shard, so it pulls only from replicas of its own rank (planner.plan_per_rank);
  its rank is its pod's label named by the source's spec.layout.rankLabel.
- transform reshard to targetTensorParallelSize T: each target (rank r of T) gets
  one ready replica of every source rank, in rank order (planner.plan_reshard),
  and its agent builds rank r's shard from them (ferry_agent.transform.reshard).
- transform fp8-block: the sources themselves publish FP8 with block scales
  (spec.layout.quantization fp8-block); targets pull that layout as is.
- ranks inside pods (the source's spec.layout.ranksPerPod k, the job's
  spec.targetRanksPerPod L): a pod's rank label is its pod rank p and its local rank
  l holds global rank p * k + l (ferry_api.ranks); each target rank pulls from the
  source rank of the same global rank, wherever it lives, or for reshard builds its
  shard from one replica of every source rank (planner.plan_ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferry_api.ranks import address
from ferry_api.refitjob import RefitJobSpec

from ..conditions import Cond
from ..planner import Peer, Plan, TargetState, plan, plan_per_rank, plan_ranks, plan_reshard
from . import weightsource

DEFAULT_RANK_LABEL = "ferry.dev/tp-rank"
# ferry_agent.transform.fp8 publishes 128x128 block scales.
FP8_BLOCK = 128


@dataclass(frozen=True)
class SourceLayout:
    tp: int = 1
    rank_label: str = DEFAULT_RANK_LABEL
    quantization: str = "none"
    ranks_per_pod: int = 1

    @classmethod
    def of(cls, source: dict[str, Any] | None) -> SourceLayout:
        layout = ((source or {}).get("spec") or {}).get("layout") or {}
        return cls(
            int(layout.get("tensorParallelSize") or 1),
            layout.get("rankLabel") or DEFAULT_RANK_LABEL,
            layout.get("quantization") or "none",
            int(layout.get("ranksPerPod") or 1),
        )

    @property
    def pod_ranks(self) -> int:
        """Pod ranks 0..P-1 (P = tp / ranksPerPod): the values of the rank label."""
        return max(1, self.tp // self.ranks_per_pod)


@dataclass(frozen=True)
class TargetLayout:
    """The targets' tensor-parallel size and local ranks per pod."""

    tp: int
    ranks_per_pod: int

    @classmethod
    def of(cls, spec: RefitJobSpec, source: dict[str, Any] | None) -> TargetLayout:
        layout = SourceLayout.of(source)
        if spec.transform.type == "reshard":
            return cls(
                spec.transform.target_tensor_parallel_size or 1, spec.target_ranks_per_pod or 1
            )
        return cls(layout.tp, spec.target_ranks_per_pod or layout.ranks_per_pod)

    @property
    def pod_ranks(self) -> int:
        return max(1, self.tp // self.ranks_per_pod)

    def globals_of(self, pod_rank: int) -> tuple[int, ...]:
        """The global rank of each local rank of the target with this pod rank."""
        return tuple(pod_rank * self.ranks_per_pod + local for local in range(self.ranks_per_pod))


def refusal(spec: RefitJobSpec, source: dict[str, Any] | None) -> Cond | None:
    """Why this job cannot run at all (a Failed condition naming the field and the fix)."""
    t = spec.transform
    if t.type == "reshard":
        if spec.strategy.type != "direct":
            return Cond(
                "Failed",
                True,
                "UnsupportedStrategy",
                f"spec.strategy.type {spec.strategy.type} cannot be combined with "
                "spec.transform.type reshard: each target builds its own shard from every "
                "source rank; set spec.strategy.type: direct",
            )
        if spec.pause.mode == "doubleBuffer":
            return Cond(
                "Failed",
                True,
                "UnsupportedPauseMode",
                "spec.pause.mode doubleBuffer cannot be combined with spec.transform.type "
                "reshard (the reshard writes the slabs the engine maps); set "
                "spec.pause.mode: engine, or none for targets that are not serving",
            )
    if source is None:
        return None
    name = (source.get("metadata") or {}).get("name") or spec.source_ref.name
    layout = SourceLayout.of(source)
    target = TargetLayout.of(spec, source)
    if target.tp % target.ranks_per_pod:
        return Cond(
            "Failed",
            True,
            "TargetRanksPerPodInvalid",
            f"spec.targetRanksPerPod {target.ranks_per_pod} does not divide the targets' "
            f"tensor-parallel size {target.tp} (WeightSource {name!r} spec.layout.tensorParallelSize): "
            "set spec.targetRanksPerPod to a divisor of it, or use transform reshard",
        )
    if t.type == "fp8-block":
        if layout.quantization != "fp8-block":
            return Cond(
                "Failed",
                True,
                "SourceNotQuantized",
                f"spec.transform.type fp8-block needs sources that publish FP8 with block "
                f"scales, but WeightSource {name!r} has spec.layout.quantization "
                f"{layout.quantization}; publish FP8 (ferry_agent.transform.fp8) and set "
                "spec.layout.quantization: fp8-block on the WeightSource, or use "
                "spec.transform.type: none",
            )
        if t.block_size != FP8_BLOCK:
            return Cond(
                "Failed",
                True,
                "UnsupportedBlockSize",
                f"spec.transform.blockSize {t.block_size}: sources publish "
                f"{FP8_BLOCK}x{FP8_BLOCK} block scales; set spec.transform.blockSize: {FP8_BLOCK}",
            )
    if t.type == "reshard" and layout.quantization != "none":
        return Cond(
            "Failed",
            True,
            "UnsupportedTransform",
            f"spec.transform.type reshard cannot split the block scales of WeightSource "
            f"{name!r} (spec.layout.quantization {layout.quantization}); reshard a "
            "WeightSource with spec.layout.quantization: none",
        )
    return None


def needs_ranks(spec: RefitJobSpec, source: dict[str, Any] | None) -> bool:
    """Whether targets' ranks (their pod labels) matter: a TP source, or a reshard."""
    return spec.transform.type == "reshard" or SourceLayout.of(source).tp > 1


def in_pods(spec: RefitJobSpec, source: dict[str, Any] | None) -> bool:
    """Whether ranks live inside pods on either side (then planner.plan_ranks plans)."""
    return (
        SourceLayout.of(source).ranks_per_pod > 1 or TargetLayout.of(spec, source).ranks_per_pod > 1
    )


def target_ranks(
    spec: RefitJobSpec, source: dict[str, Any] | None, labels: dict[str, dict[str, str]]
) -> tuple[dict[str, int] | None, dict[str, tuple[str, str]]]:
    """Each target's pod rank from its pod label (its tensor-parallel rank for one rank
    per pod), or None when ranks do not matter (a TP 1 source, no reshard). Second:
    targets that cannot take part, with (reason, message)."""
    layout = SourceLayout.of(source)
    reshard = spec.transform.type == "reshard"
    size = TargetLayout.of(spec, source).pod_ranks
    if not needs_ranks(spec, source):
        return None, {}
    ranks: dict[str, int] = {}
    bad: dict[str, tuple[str, str]] = {}
    for pod, lab in labels.items():
        value = (lab or {}).get(layout.rank_label)
        if value is None and size == 1:
            ranks[pod] = 0  # a TP 1 target needs no label
        elif value is None:
            bad[pod] = (
                "MissingRankLabel",
                f"pod has no label {layout.rank_label}: label each target with its "
                f"tensor-parallel rank 0..{size - 1} (the label is the WeightSource's "
                "spec.layout.rankLabel)",
            )
        elif not value.isdigit() or int(value) >= size:
            what = (
                "target tensor-parallel size (spec.transform.targetTensorParallelSize)"
                if reshard
                else "the WeightSource's spec.layout.tensorParallelSize"
            )
            bad[pod] = (
                "RankOutOfRange",
                f"label {layout.rank_label}={value} is not a rank in 0..{size - 1} of {what} {size}",
            )
        else:
            ranks[pod] = int(value)
    return ranks, bad


def sources_by_rank(
    source: dict[str, Any], version: str | None, live: set[str]
) -> dict[int, list[Peer]]:
    """Ready, live replicas with an endpoint that are consistent with their pod rank's
    majority fingerprint and hold `version`, by global rank: with ranksPerPod k > 1 each
    local rank l of a pod of pod rank p is a replica of rank p * k + l, addressed `pod/l`."""
    layout = SourceLayout.of(source)
    k = layout.ranks_per_pod
    members = [
        m
        for m in weightsource.read_members(source.get("status"))
        if m.state == "Ready" and m.pod in live and m.endpoint and (m.local_ranks or 1) == k
    ]
    rk = weightsource.ranks(layout.pod_ranks, members)
    out: dict[int, list[Peer]] = {r: [] for r in range(layout.tp)}
    for p, ms in rk.serving(version).items():
        for m in ms:
            for local in range(k):
                out[p * k + local].append(Peer(address(m.pod, local, k), m.node))
    return out


def plan_targets(
    spec: RefitJobSpec,
    source: dict[str, Any],
    version: str | None,
    live: set[str],
    states: list[TargetState],
    ranks: dict[str, int] | None,
    plain: list[Peer],
) -> Plan:
    """Assignments for this reconcile. `plain`: the ready replicas of a TP 1 source
    (handlers.refitjob.ready_sources), used when ranks do not matter."""
    s = spec.strategy
    if ranks is None:
        return plan(s.type, plain, states, s.max_fan_out, s.parallel_sources)
    states = [t for t in states if t.pod in ranks]
    if in_pods(spec, source):
        target = TargetLayout.of(spec, source)
        reshard = SourceLayout.of(source).tp if spec.transform.type == "reshard" else 0
        return plan_ranks(
            s.type,
            sources_by_rank(source, version, live),
            states,
            {p: target.globals_of(r) for p, r in ranks.items()},
            reshard,
            s.max_fan_out,
            s.parallel_sources,
        )
    if spec.transform.type == "reshard":
        tp = SourceLayout.of(source).tp
        by_rank = (
            [plain]
            if tp == 1
            else [v for _, v in sorted(sources_by_rank(source, version, live).items())]
        )
        return plan_reshard(by_rank, states, s.max_fan_out)
    return plan_per_rank(
        s.type,
        sources_by_rank(source, version, live),
        states,
        ranks,
        s.max_fan_out,
        s.parallel_sources,
    )


def bytes_per_target(spec: RefitJobSpec, source: dict[str, Any] | None) -> int:
    """About what one target pulls: the source's status.bytes is one full copy (all
    ranks); a target holds its local ranks' share of it (replicated tensors make this an
    estimate for TP > 1)."""
    total = ((source or {}).get("status") or {}).get("bytes") or 0
    target = TargetLayout.of(spec, source)
    return total // target.tp * target.ranks_per_pod
