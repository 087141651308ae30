"""Tensor-parallel ranks inside pods: how global ranks map to (pod, local rank).

A tensor-parallel layout of size S is held by pods of `ranksPerPod` k local ranks each
(one per GPU: `ferry agent run --devices 0,1`). A pod's *pod rank* p is its rank label
(spec.layout.rankLabel, 0..S/k-1; no label is needed when k == S), and its local rank
l holds global rank

    global = p * k + l

A rank is addressed as `pod` (a pod of one rank) or `pod/l` (local rank l of a pod of
several), the way the agent addresses a source as `host:port/l`. A RefitJob target
entry's `source` lists, for a target of several local ranks, one comma-separated group
of addresses per local rank, groups separated by `|` (pod names hold neither `/` nor
`|`): `trainer-0/0|trainer-0/1`. Single-rank pods keep the plain form `trainer-0`.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

MAX_RANKS_PER_POD = 64


class RankAddress(NamedTuple):
    pod: str
    local: int = 0

    @classmethod
    def parse(cls, text: str) -> RankAddress:
        pod, sep, local = text.partition("/")
        return cls(pod, int(local) if sep and local.isdigit() else 0)


def address(pod: str, local: int, ranks_per_pod: int) -> str:
    """`pod` for a pod of one rank, `pod/local` otherwise."""
    return pod if ranks_per_pod == 1 else f"{pod}/{local}"


def global_rank(pod_rank: int, local: int, ranks_per_pod: int) -> int:
    return pod_rank * ranks_per_pod + local


def join_groups(groups: list[tuple[str, ...]]) -> str:
    """A target entry's `source`: one group of addresses per local rank."""
    return "|".join(",".join(g) for g in groups)


def split_groups(source: str | None) -> list[tuple[str, ...]]:
    """The inverse of join_groups: per local rank, its upstream addresses."""
    return [tuple(a for a in g.split(",") if a) for g in (source or "").split("|")]


def pods_of(source: str | None) -> tuple[str, ...]:
    """The distinct upstream pods of an entry's `source`, in order of first mention."""
    out: dict[str, None] = {}
    for group in split_groups(source):
        for a in group:
            out.setdefault(RankAddress.parse(a).pod, None)
    return tuple(out)


def per_rank(source: str | None) -> bool:
    """Whether `source` addresses ranks inside pods (then each local rank pulls its own group)."""
    return bool(source) and ("|" in source or "/" in source)  # type: ignore[operator]


def combined(per_rank_values: dict[int, str]) -> str:
    """One hash over several ranks' fingerprints (or digests): `tp<n>:` and the sha256
    (hex) of the lines `<rank>=<value>` in rank order. A TP S source's status.fingerprint
    is this over its pod ranks; a pod of several local ranks reports this over its
    global ranks (so a pod holding every rank reports what S one-rank pods add up to)."""
    lines = "\n".join(f"{r}={per_rank_values[r]}" for r in sorted(per_rank_values))
    return f"tp{len(per_rank_values)}:{hashlib.sha256(lines.encode()).hexdigest()}"
