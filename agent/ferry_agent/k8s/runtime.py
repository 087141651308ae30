"""Connect a running Agent to the control plane: its Lease + entry, and its assignments.

Enabled when the agent runs in a cluster (service-account credentials) or a
kubeconfig is given (the local dev cluster and tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

from ferry_api.ranks import combined
from ferry_api.weightsource import RankStatus

from .artifacts import ArtifactAgent
from .following import Following
from .jobs import JobRunner
from .reporter import STATES, Identity, Reporter

log = logging.getLogger(__name__)

# A publish pokes the reporter at most this often (a trainer may publish every few ms;
# the reporter writes the Lease and the WeightSource entry on each poke).
PUBLISH_POKE_S = 0.2


class Throttle:
    """Call `fn` now, or once at the end of the current interval if it ran within it:
    the last call is never lost, and at most one call per interval happens."""

    def __init__(self, fn: Any, interval_s: float) -> None:
        self.fn, self.interval_s = fn, interval_s
        self._lock = threading.Lock()
        self._last = 0.0
        self._timer: threading.Timer | None = None

    def __call__(self) -> None:
        with self._lock:
            wait = self._last + self.interval_s - time.monotonic()
            if wait <= 0:
                self._last = time.monotonic()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._later)
                self._timer.daemon = True
                self._timer.start()
                return
            else:
                return
        self.fn()

    def _later(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        self.fn()


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


def pod_rank(env: dict[str, str] | None = None) -> int | None:
    """This pod's rank label (FERRY_TP_RANK, from the downward API), if it has one."""
    rank = (os.environ if env is None else env).get("FERRY_TP_RANK")
    return int(rank) if rank and rank.isdigit() else None


def rank_info(agent: Any) -> dict[str, Any]:
    """One local rank's state, version, fingerprint, digest, tensors, bytes and, when it
    is not Ready, why (ReplicaStatus field names)."""
    state = agent.state
    v = agent.version_info()
    info: dict[str, Any] = {
        "state": STATES.get(state, "Loading"),
        "version": v.get("version") or None,
        "fingerprint": v.get("fingerprint") or None,
    }
    record = agent.digests(v.get("version") or "")
    info["digest"] = record.total if record is not None else None
    if agent.slab_error is not None:
        info["reason"], info["message"] = agent.slab_error
    elif agent.no_version_reason:
        info["reason"] = agent.no_version_reason
    try:
        layout = agent.layout
        info["tensors"] = len(layout.placements)
        info["bytes"] = layout.nbytes
    except Exception:  # nothing declared yet
        pass
    return info


def agent_info(pod: Any) -> dict[str, Any]:
    """What the pod's replica entry reports (ReplicaStatus fields but pod, endpoint, node).

    One local rank: its own fields. Several (ferry_api.ranks): one entry still, with
    `localRanks`; fingerprint and digest combined over its global ranks (pod rank * k +
    local rank), tensors and bytes summed, Ready only when every rank is Ready on one
    version, Failed when one failed, and `ranks` listing only the local ranks that
    differ from the entry (not Ready, or another version)."""
    prank = pod_rank()
    per = [rank_info(r) for r in pod.ranks]
    if len(per) == 1:
        info = {
            key: per[0].get(key)
            for key in ("state", "version", "fingerprint", "digest", "reason", "tensors", "bytes")
        }
        if per[0]["state"] == "Failed":  # one rank: its detail on the entry's ranks list
            info["ranks"] = [
                RankStatus(
                    local_rank=0,
                    rank=prank,
                    state="Failed",
                    reason=per[0].get("reason"),
                    message=per[0].get("message"),
                ).wire()
            ]
        info["rank"] = prank
        return info
    k = len(per)
    first = (prank or 0) * k
    versions = Counter(p["version"] for p in per if p["version"])
    version = versions.most_common(1)[0][0] if versions else None
    states = [p["state"] for p in per]
    if "Failed" in states:
        state = "Failed"
    elif all(s == "Ready" for s in states):
        state = "Ready" if len(versions) == 1 else "Loading"
    else:
        state = STATES.get(pod.state, "Loading")
    info: dict[str, Any] = {"state": state, "version": version, "rank": prank, "localRanks": k}
    if all(p["fingerprint"] for p in per):
        info["fingerprint"] = combined({first + r: p["fingerprint"] for r, p in enumerate(per)})
    if version and len(versions) == 1 and all(p["digest"] for p in per):
        info["digest"] = combined({first + r: p["digest"] for r, p in enumerate(per)})
    if all(p.get("bytes") is not None for p in per):
        info["tensors"] = sum(p["tensors"] for p in per)
        info["bytes"] = sum(p["bytes"] for p in per)
    differ = [
        RankStatus(
            local_rank=r,
            rank=first + r,
            state=p["state"],
            version=p["version"],
            reason=p.get("reason"),
            message=p.get("message"),
        )
        for r, p in enumerate(per)
        if p["state"] != "Ready" or p["version"] != version
    ]
    if differ:
        info["ranks"] = [d.wire() for d in differ]
        info["reason"] = next(
            (d.reason for d in differ if d.state == state and d.reason), None
        ) or next((d.reason for d in differ if d.reason), None)
    return info


@dataclass
class ClusterSession:
    reporter: Reporter
    jobs: JobRunner
    artifacts: ArtifactAgent | None
    following: Following | None = None

    def stop(self) -> None:
        # Jobs first (cancel pulls), then the reporter: Stale is the last word.
        if self.following is not None:
            self.following.stop()
        self.jobs.stop()
        if self.artifacts is not None:
            self.artifacts.stop()
        self.reporter.stop()


def prepare(agent: Any) -> ArtifactAgent:
    """Before agent.start(): what must be registered with the agent's gRPC server."""
    return ArtifactAgent(agent)


def attach(
    agent: Any,
    pod: str,
    namespace: str,
    node: str | None,
    endpoint: str,
    lease_seconds: int = 15,
    renew_seconds: float = 5.0,
    artifacts: ArtifactAgent | None = None,
) -> ClusterSession:
    api = api_client()
    ident = Identity(pod, namespace, node, endpoint)
    reporter = Reporter(ident, lambda: agent_info(agent), api, lease_seconds, renew_seconds).start()
    jobs = JobRunner(agent, ident, api, on_done=reporter.poke)
    following = Following(agent, ident, api).start()
    jobs.listeners.append(following.saw)
    jobs.start()
    poke = Throttle(reporter.poke, PUBLISH_POKE_S)
    for rank in agent.ranks:  # a new version shows on the WeightSource without a heartbeat
        rank.on_publish.append(lambda _v, _e: poke())
    if artifacts is not None:
        artifacts.bind(ident, api).start()
    log.info("reporting to the control plane as %s/%s (%s)", namespace, pod, endpoint)
    return ClusterSession(reporter, jobs, artifacts, following)
