"""The pull a RefitJob asks of this target, by its spec.transform.

- none / fp8-block: a plain Agent.pull (an fp8-block source already publishes FP8
  weights with their block scales; the operator refuses the job otherwise).
- reshard: this target is rank r of spec.transform.targetTensorParallelSize T and
  its entry names one source replica per source rank, in rank order; the pull
  request says so (request.Reshard) and the agent's ReshardPull builds rank r's
  shard from them (kept across jobs: see transform/reshard_pull.py).

r is this pod's label named by the WeightSource's spec.layout.rankLabel, read at
each attempt, as the operator reads it (a TP 1 target needs no label).

Ranks inside pods (the assignment's `ranks`, ferry_api.ranks): each local rank l of
this pod pulls its own group of upstream ranks, all at once (each its own NIXL agents
and slabs); for reshard it builds global rank p * L + l of T (p: the rank label, L:
this agent's local ranks). The attempt fails if any rank fails, with that rank named
(the first failing local rank's reason). Every pull is
bounded by the WeightSource's status (source_bounds: a fresh target adopts no layout
larger than status.bytes, nor one whose fingerprint is not status.fingerprint).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from kubernetes import client

from ferry_api import GROUP, VERSION
from ferry_api.objects import Object, read
from ferry_api.refitjob import RefitJobSpec
from ferry_api.weightsource import WeightSource, WeightSourceSpec, WeightSourceStatus

from ..errors import FerryError
from ..request import PullRequest, Reshard
from .reporter import Identity

log = logging.getLogger(__name__)
Source: TypeAlias = Object[WeightSourceSpec, WeightSourceStatus]


class MissingRankLabel(FerryError):
    reason = "MissingRankLabel"


class RankOutOfRange(FerryError):
    reason = "RankOutOfRange"


class UnsupportedTransform(FerryError):
    reason = "UnsupportedTransform"


class RanksMismatch(FerryError):
    reason = "RanksMismatch"


@dataclass(frozen=True)
class RanksResult:
    """The pulls of every local rank of one attempt (`results` in local-rank order)."""

    results: tuple[Any, ...]

    @property
    def bytes(self) -> int:
        return sum(int(r.bytes) for r in self.results)


def on_rank(exc: FerryError, local: int, rank: int | None) -> FerryError:
    """`exc` as the failure of local rank `local` (global `rank`): same reason, the rank
    named first in the message."""
    where = f"local rank {local}" + (f" (rank {rank})" if rank is not None else "")
    out = FerryError(f"{where}: {exc.message}", **{**exc.fields, "local_rank": local})
    out.reason = exc.reason
    return out


def target_rank(labels: dict[str, str], label: str, tp: int) -> int:
    """This target's rank in 0..tp-1 from its pod label (0 for tp 1 without one)."""
    value = labels.get(label)
    if value is None:
        if tp == 1:
            return 0
        raise MissingRankLabel(
            f"pod has no label {label}: label it with its tensor-parallel rank 0..{tp - 1} "
            "(the label is the WeightSource's spec.layout.rankLabel)",
            label=label,
        )
    if not value.isdigit() or int(value) >= tp:
        raise RankOutOfRange(f"label {label}={value} is not a rank in 0..{tp - 1}", label=label)
    return int(value)


def source_bounds(ws: Source, *, reshard: bool) -> dict[str, Any]:
    """PullRequest bounds from the WeightSource's status (bounds.py): its bytes (one
    full copy: every shard and every rank's replica fits in it) and, for a TP 1 source
    pulled as is, its fingerprint (a TP > 1 one, tp<S>:..., is no replica's; a reshard
    builds a layout of its own)."""
    out: dict[str, Any] = {}
    if ws.status.bytes:
        out["max_bytes"] = ws.status.bytes
    if not reshard and ws.spec.layout.tensor_parallel_size == 1 and ws.status.fingerprint:
        out["fingerprint"] = ws.status.fingerprint
    return out


class TransformPulls:
    """The job runner's pulls: a PullRequest for the job's spec (a reshard for
    `transform: reshard`, this target's rank read from its pod label)."""

    def __init__(self, agent: Any, ident: Identity, api: client.ApiClient) -> None:
        self.agent, self.ident, self.api = agent, ident, api

    def pull(
        self,
        spec: RefitJobSpec,
        endpoints: list[str],
        *,
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
        ranks: list[list[str]] | None = None,
        **fields: Any,
    ) -> Any:
        """`fields` are PullRequest's (version, timeout_s, ...); returns the PullResult."""
        ws = self._source(spec)
        if ranks is not None:
            return self._pull_ranks(spec, ws, ranks, cancel=cancel, progress=progress, **fields)
        if len(self.agent.ranks) != 1:
            raise RanksMismatch(
                f"the job assigns one rank but this pod's agent serves {len(self.agent.ranks)}: set the "
                f"RefitJob's spec.targetRanksPerPod (or the WeightSource's spec.layout.ranksPerPod) to "
                f"{len(self.agent.ranks)}",
                ranks=1,
                local_ranks=len(self.agent.ranks),
            )
        reshard = None
        if spec.transform.type == "reshard":
            tp = spec.transform.target_tensor_parallel_size
            assert tp is not None  # RefitJobSpec's rule: reshard names it
            reshard = Reshard(target_rank(self._labels(), ws.spec.layout.rank_label, tp), tp)
        fields = {**source_bounds(ws, reshard=reshard is not None), **fields}
        if reshard is not None and (fields.get("relay") or fields.get("double_buffer")):
            raise UnsupportedTransform(
                "transform reshard pulls straight from the source ranks into the active slabs: "
                "no relay, no double buffer"
            )
        request = PullRequest(tuple(endpoints), reshard=reshard, **fields)  # BadRequest
        res = self.agent.pull(request, cancel=cancel, progress=progress)
        if reshard is not None:
            d = res.details
            log.info(
                "reshard TP%d -> rank %d of TP%d: %d bytes, %d direct + %d scratch pieces, %s",
                len(endpoints),
                reshard.rank,
                reshard.tp,
                res.bytes,
                d["direct_pieces"],
                d["scratch_pieces"],
                "re-planned" if d["replanned"] else "plan reused",
            )
        return res

    def _pull_ranks(
        self,
        spec: RefitJobSpec,
        ws: Source,
        ranks: list[list[str]],
        *,
        cancel: threading.Event | None,
        progress: Callable[[int], None] | None,
        **fields: Any,
    ) -> RanksResult:
        """Every local rank's pull at once (`ranks[l]`: local rank l's source addresses,
        host:port/r); the first failing rank (in local-rank order) fails the attempt."""
        have = len(self.agent.ranks)
        if len(ranks) != have:
            raise RanksMismatch(
                f"the job assigns {len(ranks)} local ranks but this pod's agent serves {have} "
                "(--devices/--ranks): set the RefitJob's spec.targetRanksPerPod (or the WeightSource's "
                f"spec.layout.ranksPerPod) to {have}, or run the agent with one device per rank",
                ranks=len(ranks),
                local_ranks=have,
            )
        reshard = spec.transform.type == "reshard"
        prank = 0
        tp = (spec.transform.target_tensor_parallel_size or 1) if reshard else 0
        if reshard:
            prank = target_rank(self._labels(), ws.spec.layout.rank_label, max(1, tp // have))
        fields = {**source_bounds(ws, reshard=reshard), **fields}
        done = [0] * have
        results: list[Any] = [None] * have
        errors: list[FerryError | None] = [None] * have

        def one(local: int) -> None:
            def moved(n: int) -> None:
                done[local] = n
                if progress is not None:
                    progress(sum(done))

            try:
                request = PullRequest(
                    tuple(ranks[local]),
                    rank=local,
                    **fields,
                    reshard=Reshard(prank * have + local, tp) if reshard else None,
                )
                results[local] = self.agent.pull(request, cancel=cancel, progress=moved)
            except FerryError as exc:
                errors[local] = exc
            except Exception as exc:  # an unexpected error still names its rank
                errors[local] = FerryError(f"{type(exc).__name__}: {exc}")
                errors[local].reason = "AgentError"  # type: ignore[misc]

        threads = [
            threading.Thread(target=one, args=(r,), name=f"ferry-pull-r{r}", daemon=True)
            for r in range(have)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for local, exc in enumerate(errors):
            if exc is not None:
                raise on_rank(exc, local, prank * have + local if reshard else None)
        log.info("pulled %d local ranks: %s bytes", have, [int(r.bytes) for r in results])
        return RanksResult(tuple(results))

    def _source(self, spec: RefitJobSpec) -> Source:
        obj = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.ident.namespace, WeightSource.PLURAL, spec.source_ref.name
        )
        return read(WeightSource, obj)

    def _labels(self) -> dict[str, str]:
        pod = client.CoreV1Api(self.api).read_namespaced_pod(self.ident.pod, self.ident.namespace)
        return dict(pod.metadata.labels or {})

    def close(self) -> None:
        """Nothing of its own: the agent keeps (and frees) the reshard puller."""
