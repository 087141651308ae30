"""The pull a RefitJob asks of this target, by its spec.transform.

- none / fp8-block: a plain Agent.pull (an fp8-block source already publishes FP8
  weights with their block scales; the operator refuses the job otherwise).
- reshard: this target is rank r of spec.transform.targetTensorParallelSize T and
  its entry names one source replica per source rank, in rank order. A
  ReshardPuller builds rank r's shard from them. It is kept across refit cycles
  (jobs) so its plan, prepared descriptor lists and scratch are reused; its own
  cache key (sources' manifests, endpoints, our layout and slab generation, chunk
  size) re-plans whenever any of them changes, and a new (r, T) gets a new puller.

r is this pod's label named by the WeightSource's spec.layout.rankLabel, read at
each attempt, as the operator reads it (a TP 1 target needs no label).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

from kubernetes import client

from ferry_api import GROUP, VERSION
from ferry_api.weightsource import WeightSource

from ..errors import FerryError
from ..transform.reshard_pull import ReshardPuller
from .reporter import Identity

log = logging.getLogger(__name__)
DEFAULT_RANK_LABEL = "ferry.dev/tp-rank"


class MissingRankLabel(FerryError):
    reason = "MissingRankLabel"


class RankOutOfRange(FerryError):
    reason = "RankOutOfRange"


class UnsupportedTransform(FerryError):
    reason = "UnsupportedTransform"


def target_rank(labels: dict[str, str], label: str, tp: int) -> int:
    """This target's rank in 0..tp-1 from its pod label (0 for tp 1 without one)."""
    value = labels.get(label)
    if value is None:
        if tp == 1:
            return 0
        raise MissingRankLabel(
            f"pod has no label {label}: label it with its tensor-parallel rank 0..{tp - 1} "
            "(the label is the WeightSource's spec.layout.rankLabel)", label=label)
    if not value.isdigit() or int(value) >= tp:
        raise RankOutOfRange(f"label {label}={value} is not a rank in 0..{tp - 1}", label=label)
    return int(value)


class TransformPulls:
    def __init__(self, agent: Any, ident: Identity, api: client.ApiClient) -> None:
        self.agent, self.ident, self.api = agent, ident, api
        self._lock = threading.Lock()
        self._reshard: tuple[tuple[int, int], ReshardPuller] | None = None

    def pull(self, spec: dict[str, Any], endpoints: list[str], *, relay: bool = False,
             double_buffer: bool = False, **kw: Any) -> Any:
        """Agent.pull's keyword arguments; returns a result with `bytes`."""
        transform = spec.get("transform") or {}
        if transform.get("type") != "reshard":
            return self.agent.pull(endpoints, relay=relay, double_buffer=double_buffer, **kw)
        if relay or double_buffer:
            raise UnsupportedTransform(
                "transform reshard pulls straight from the source ranks into the active slabs: "
                "no relay, no double buffer")
        tp = int(transform["targetTensorParallelSize"])
        rank = target_rank(self._labels(), self._rank_label(spec), tp)
        res = self._puller(rank, tp).pull(
            endpoints,
            version=kw.get("version"),
            timeout_s=kw.get("timeout_s", 60.0),
            chunk_bytes=kw.get("chunk_bytes"),
            quiesce=kw.get("quiesce", False),
            quiesce_timeout_s=kw.get("quiesce_timeout_s", 30.0),
            cancel=kw.get("cancel"),
            progress=kw.get("progress"),
            max_gbps=kw.get("max_gbps"),
        )
        log.info("reshard TP%d -> rank %d of TP%d: %d bytes, %d direct + %d scratch pieces, %s",
                 len(endpoints), rank, tp, res.bytes, res.direct_pieces, res.scratch_pieces,
                 "re-planned" if res.replanned else "plan reused")
        return res

    def _puller(self, rank: int, tp: int) -> ReshardPuller:
        with self._lock:
            if self._reshard is not None and self._reshard[0] != (rank, tp):
                self._reshard[1].close()  # the plan depends on (rank, tp): start over
                self._reshard = None
            if self._reshard is None:
                self._reshard = ((rank, tp), ReshardPuller(self.agent, target_rank=rank, target_tp=tp))
            return self._reshard[1]

    def _rank_label(self, spec: dict[str, Any]) -> str:
        ws = cast(dict[str, Any], client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.ident.namespace, WeightSource.PLURAL, spec["sourceRef"]["name"]))
        return ((ws.get("spec") or {}).get("layout") or {}).get("rankLabel") or DEFAULT_RANK_LABEL

    def _labels(self) -> dict[str, str]:
        pod = client.CoreV1Api(self.api).read_namespaced_pod(self.ident.pod, self.ident.namespace)
        return dict(pod.metadata.labels or {})

    def close(self) -> None:
        """Free the reshard scratch; call only when no pull is running."""
        with self._lock:
            if self._reshard is not None:
                self._reshard[1].close()
                self._reshard = None
