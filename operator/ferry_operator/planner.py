"""Which source serves which target: pure functions over plain data.

Three fan-out strategies (RefitJob.spec.strategy.type):
- direct: every target pulls from the original ready sources, spread least-loaded
  first, same node first, at most `max_fan_out` targets per source at a time.
- tree: finished targets become sources too, so capacity doubles each round;
  fan-out per source stays bounded.
- chain: targets form relays of one upstream each (source -> t0 -> t1 -> ...);
  each relay forwards chunks as they land, so N targets take little more than
  one transfer. Several chains run in parallel, one per ready source.

A target that failed on a source is not given that source again while another
exists (retry on another source); `parallel_sources` > 1 (direct only) stripes
one target's pull across that many distinct sources.

Tensor-parallel sources (each replica holds one rank's shard):
- plan_per_rank: targets with the sources' layout pull only from replicas (and,
  for tree and chain, finished targets) of their own rank; any strategy.
- plan_reshard: a target with another TP size gets one replica of every source
  rank, in rank order, to build its own shard from (direct only).

Ranks inside pods (spec.layout.ranksPerPod, spec.targetRanksPerPod; ferry_api.ranks):
- plan_ranks: every local rank of a source or target pod is a unit of its own,
  addressed `pod/l` and holding global rank p * ranksPerPod + l; plan_per_rank or
  plan_reshard runs over the units (fan-out is per rank: each GPU has its own NIC),
  and a target pod is assigned only once every one of its local ranks has a source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ferry_api.ranks import address


@dataclass(frozen=True)
class Peer:
    pod: str
    node: str | None = None


@dataclass
class TargetState:
    pod: str
    node: str | None = None
    phase: str = "Pending"  # Pending | Assigned | Pulling | Done | Failed
    sources: tuple[str, ...] = ()
    failed_sources: frozenset[str] = frozenset()
    # With ranks inside pods: the upstream addresses of each local rank (entry's source).
    groups: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Plan:
    """New assignments (target pod -> upstream pods, in stripe order) and who must wait.
    `groups` (plan_ranks): target pod -> the upstream addresses of each of its local ranks."""

    assign: dict[str, tuple[str, ...]] = field(default_factory=dict)
    waiting: tuple[str, ...] = ()
    exhausted: tuple[str, ...] = ()  # no source left that has not already failed for them
    groups: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)


ACTIVE = ("Assigned", "Pulling")


def _load(targets: Iterable[TargetState]) -> dict[str, int]:
    load: dict[str, int] = {}
    for t in targets:
        if t.phase in ACTIVE:
            for s in t.sources:
                load[s] = load.get(s, 0) + 1
    return load


def _pick(
    target: TargetState,
    candidates: list[Peer],
    load: dict[str, int],
    nodes: dict[str, str | None],
    max_fan_out: int,
    want: int,
) -> tuple[str, ...]:
    """Up to `want` distinct sources with spare capacity: same node, then least loaded, then name."""
    usable = [c for c in candidates if c.pod not in target.failed_sources and c.pod != target.pod]
    if not usable:
        usable = [
            c for c in candidates if c.pod != target.pod
        ]  # every source failed once: retry any
    free = [c for c in usable if load.get(c.pod, 0) < max_fan_out]
    free.sort(
        key=lambda c: (
            nodes.get(c.pod) != target.node or target.node is None,
            load.get(c.pod, 0),
            c.pod,
        )
    )
    return tuple(c.pod for c in free[:want])


def plan(
    strategy: str,
    sources: list[Peer],
    targets: list[TargetState],
    max_fan_out: int = 4,
    parallel_sources: int = 1,
) -> Plan:
    if strategy == "chain":
        return _plan_chain(sources, targets)
    nodes = {p.pod: p.node for p in sources} | {t.pod: t.node for t in targets}
    candidates = list(sources)
    if strategy == "tree":
        candidates += [Peer(t.pod, t.node) for t in targets if t.phase == "Done"]
    want = parallel_sources if strategy == "direct" else 1
    load = _load(targets)
    assign: dict[str, tuple[str, ...]] = {}
    waiting, exhausted = [], []
    for target in sorted((t for t in targets if t.phase == "Pending"), key=lambda t: t.pod):
        if not candidates:
            exhausted.append(target.pod)
            continue
        picked = _pick(target, candidates, load, nodes, max_fan_out, want)
        if not picked:
            waiting.append(target.pod)
            continue
        assign[target.pod] = picked
        for s in picked:
            load[s] = load.get(s, 0) + 1
    return Plan(assign, tuple(waiting), tuple(exhausted))


def _plan_chain(sources: list[Peer], targets: list[TargetState]) -> Plan:
    """Chains of relays, one per source; a target's upstream is the previous link.

    Existing links are kept; a Pending target joins the shortest chain. A target
    whose upstream failed (and is not Done) is re-linked to that chain's source.
    """
    if not sources:
        return Plan(exhausted=tuple(t.pod for t in targets if t.phase == "Pending"))
    by_pod = {t.pod: t for t in targets}
    source_pods = {s.pod for s in sources}
    tails: dict[str, str] = {}  # chain head (source) -> last link
    lengths: dict[str, int] = {s.pod: 0 for s in sources}
    for t in sorted(targets, key=lambda t: t.pod):
        if t.phase in (*ACTIVE, "Done") and t.sources:
            head = _chain_head(t.pod, by_pod, source_pods)
            if head in lengths:
                lengths[head] += 1
                tails[head] = _deeper(tails.get(head), t.pod, by_pod, source_pods)
    assign: dict[str, tuple[str, ...]] = {}
    for target in sorted((t for t in targets if t.phase == "Pending"), key=lambda t: t.pod):
        heads = [s.pod for s in sources if s.pod not in target.failed_sources] or [
            s.pod for s in sources
        ]
        head = min(heads, key=lambda h: (lengths[h], h))
        upstream = tails.get(head, head)
        if upstream in target.failed_sources:
            upstream = head
        assign[target.pod] = (upstream,)
        tails[head] = target.pod
        lengths[head] += 1
    return Plan(assign)


def _chain_head(pod: str, by_pod: dict[str, TargetState], source_pods: set[str]) -> str | None:
    seen = set()
    while pod not in source_pods:
        if pod in seen or pod not in by_pod or not by_pod[pod].sources:
            return None
        seen.add(pod)
        pod = by_pod[pod].sources[0]
    return pod


def _depth(pod: str, by_pod: dict[str, TargetState], source_pods: set[str]) -> int:
    depth = 0
    while pod not in source_pods and pod in by_pod and by_pod[pod].sources and depth < 10_000:
        pod = by_pod[pod].sources[0]
        depth += 1
    return depth


def _deeper(
    current: str | None, candidate: str, by_pod: dict[str, TargetState], source_pods: set[str]
) -> str:
    if current is None:
        return candidate
    return max((current, candidate), key=lambda p: (_depth(p, by_pod, source_pods), p))


def plan_per_rank(
    strategy: str,
    sources: dict[int, list[Peer]],
    targets: list[TargetState],
    ranks: dict[str, int],
    max_fan_out: int = 4,
    parallel_sources: int = 1,
) -> Plan:
    """`plan` run separately for each rank: a target of rank r is served only by
    sources of rank r (`ranks`: target pod -> rank; targets not in it are left out)."""
    assign: dict[str, tuple[str, ...]] = {}
    waiting: list[str] = []
    exhausted: list[str] = []
    for r in sorted(set(ranks.values())):
        part = plan(
            strategy,
            sources.get(r, []),
            [t for t in targets if ranks.get(t.pod) == r],
            max_fan_out,
            parallel_sources,
        )
        assign |= part.assign
        waiting += part.waiting
        exhausted += part.exhausted
    return Plan(assign, tuple(sorted(waiting)), tuple(sorted(exhausted)))


def plan_reshard(
    sources: list[list[Peer]], targets: list[TargetState], max_fan_out: int = 4
) -> Plan:
    """Each Pending target gets one ready replica of every source rank (`sources[k]`:
    the replicas of rank k), in rank order: same node first, then least loaded. A
    target is assigned only when every rank has a replica with spare capacity."""
    nodes = {p.pod: p.node for rank in sources for p in rank} | {t.pod: t.node for t in targets}
    load = _load(targets)
    assign: dict[str, tuple[str, ...]] = {}
    waiting, exhausted = [], []
    for target in sorted((t for t in targets if t.phase == "Pending"), key=lambda t: t.pod):
        if not sources or not all(sources):
            exhausted.append(target.pod)
            continue
        picked = [_pick(target, rank, load, nodes, max_fan_out, 1) for rank in sources]
        if not all(picked):
            waiting.append(target.pod)
            continue
        assign[target.pod] = tuple(p[0] for p in picked)
        for p in picked:
            load[p[0]] = load.get(p[0], 0) + 1
    return Plan(assign, tuple(waiting), tuple(exhausted))


def plan_ranks(
    strategy: str,
    sources: dict[int, list[Peer]],
    targets: list[TargetState],
    ranks: dict[str, tuple[int, ...]],
    reshard: int = 0,
    max_fan_out: int = 4,
    parallel_sources: int = 1,
) -> Plan:
    """Plan with ranks inside pods. `sources`: global source rank -> its ready replicas,
    each a rank address (`pod/l`); `ranks`: target pod -> the global rank of each of its
    local ranks (targets not in it are left out); `reshard`: the source's TP size S when
    each target rank builds its shard from one replica of every source rank, 0 for
    same-rank pulls (a target rank g pulls from source replicas of rank g)."""
    units: list[TargetState] = []
    unit_rank: dict[str, int] = {}
    for t in targets:
        gs = ranks.get(t.pod)
        if gs is None:
            if t.phase in ACTIVE:  # what it pulls still loads its sources
                units.append(TargetState(t.pod, t.node, t.phase, t.sources))
            continue
        for local, g in enumerate(gs):
            name = address(t.pod, local, len(gs))
            ups = t.groups[local] if local < len(t.groups) else t.sources if len(gs) == 1 else ()
            failed = frozenset(ups) if t.failed_sources else frozenset()
            units.append(TargetState(name, t.node, t.phase, ups, failed))
            unit_rank[name] = g
    if reshard:
        part = plan_reshard([sources.get(r, []) for r in range(reshard)], units, max_fan_out)
    else:
        part = plan_per_rank(strategy, sources, units, unit_rank, max_fan_out, parallel_sources)
    short = set(part.waiting)
    out_of = set(part.exhausted)
    assign: dict[str, tuple[str, ...]] = {}
    groups: dict[str, tuple[tuple[str, ...], ...]] = {}
    waiting: list[str] = []
    exhausted: list[str] = []
    for t in sorted(
        (t for t in targets if t.phase == "Pending" and t.pod in ranks), key=lambda t: t.pod
    ):
        names = [address(t.pod, local, len(ranks[t.pod])) for local in range(len(ranks[t.pod]))]
        picks = [part.assign.get(n) for n in names]
        if all(picks):
            groups[t.pod] = tuple(p for p in picks if p)
            assign[t.pod] = tuple(dict.fromkeys(a for p in groups[t.pod] for a in p))
        elif any(n in out_of for n in names):
            exhausted.append(t.pod)
        elif any(n in short for n in names) or any(picks):
            waiting.append(t.pod)
    return Plan(assign, tuple(waiting), tuple(exhausted), groups)
