"""Whom an agent talks to in cluster mode: the pods it shares a group with.

A pod's certificate proves which pod is calling (or answering); this decides whether
that pod may. The groups, read from the apiserver, never from what a peer says:

    WeightSource W      the pods W's selector selects (its members), and the pods
                        selected by `spec.targets` of any RefitJob whose sourceRef is
                        W (they pull from the members, and from each other in a tree
                        or chain)
    ArtifactCache C     the pods selected by C's `spec.sources` or `spec.targets`

Two pods of one namespace are related when one group holds both. A source serves its
manifest, NIXL metadata, version header words, digests and caches only to related
pods; a target dials only related pods. Both sides look at the peer's Pod object:
its labels, its uid (a certificate of a deleted pod whose name was reused names
another uid) and whether it still runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from kubernetes import client

from ferry_api import GROUP, VERSION
from ferry_api.artifactcache import ArtifactCache
from ferry_api.meta import selector_matches
from ferry_api.refitjob import RefitJob
from ferry_api.weightsource import WeightSource

from ..peerid import PodIdentity

log = logging.getLogger(__name__)

# The groups are listed at most this often; a peer found related is not looked at again
# for ALLOWED_S (a source serving 1,000 targets that each call every step would otherwise
# read a Pod per call). A refused peer is looked at again at its next call.
CACHE_S = 2.0
ALLOWED_S = 10.0
# A refusal is decided on freshly listed groups (a job created a moment ago counts) and
# then holds this long: a refused caller cannot make us read the apiserver per call.
REFUSED_S = 1.0

Labels = Mapping[str, str]


def groups(
    weightsources: Sequence[dict[str, Any]],
    refitjobs: Sequence[dict[str, Any]],
    artifactcaches: Sequence[dict[str, Any]],
) -> list[tuple[str, list[dict[str, Any]]]]:
    """(group name, its selectors) for every group of the namespace (pure)."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for ws in weightsources:
        name = ws["metadata"]["name"]
        sels = [(ws.get("spec") or {}).get("selector") or {}]
        for job in refitjobs:
            spec = job.get("spec") or {}
            if (spec.get("sourceRef") or {}).get("name") == name:
                sels.append(spec.get("targets") or {})
        out.append((f"WeightSource {name}", sels))
    for ac in artifactcaches:
        spec = ac.get("spec") or {}
        out.append(
            (
                f"ArtifactCache {ac['metadata']['name']}",
                [spec.get("sources") or {}, spec.get("targets") or {}],
            )
        )
    return out


def related(
    me: Labels, peer: Labels, groups_: Sequence[tuple[str, list[dict[str, Any]]]]
) -> str | None:
    """The first group that holds both pods (None: no group does). An empty selector
    selects nothing here (the CRDs refuse one anyway)."""

    def held(labels: Labels, sels: list[dict[str, Any]]) -> bool:
        return any(s and selector_matches(s, dict(labels)) for s in sels)

    for name, sels in groups_:
        if held(me, sels) and held(peer, sels):
            return name
    return None


def refusal(pod: dict[str, Any] | None, peer: PodIdentity) -> str | None:
    """Why the Pod object does not back `peer`'s certificate (None: it does)."""
    if pod is None:
        return "no such pod"
    meta = pod.get("metadata") or {}
    if peer.uid and meta.get("uid") != peer.uid:
        return f"its certificate names uid {peer.uid}, the pod now is {meta.get('uid')}"
    if meta.get("deletionTimestamp"):
        return "the pod is being deleted"
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return "the pod has finished"
    return None


class ClusterPeers:
    """`allow(peer)` for auth.PeerTls: None when `peer` is a live pod related to ours."""

    def __init__(
        self, api: client.ApiClient, me: PodIdentity, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.api, self.me, self.clock = api, me, clock
        self._lock = threading.Lock()
        self._groups: tuple[float, list[tuple[str, list[dict[str, Any]]]]] | None = None
        self._allowed: dict[PodIdentity, float] = {}  # peer -> when it was last allowed
        self._refused: dict[PodIdentity, tuple[float, str]] = {}  # peer -> (when, why)

    def allow(self, peer: PodIdentity) -> str | None:
        if peer.namespace != self.me.namespace:
            return f"another namespace than ours ({self.me.namespace})"
        now = self.clock()
        with self._lock:
            seen = self._allowed.get(peer)
            if seen is not None and now - seen < ALLOWED_S:
                return None
            no = self._refused.get(peer)
            if no is not None and now - no[0] < REFUSED_S:
                return no[1]
        try:
            why = self._decide(peer)
            if why is not None:
                why = self._decide(peer, fresh=True)
        except client.ApiException as exc:
            return f"membership not readable from the apiserver ({exc.status} {exc.reason})"
        except Exception as exc:  # apiserver away: refuse, the caller retries
            return f"membership not readable from the apiserver ({exc})"
        with self._lock:
            if len(self._allowed) + len(self._refused) > 10_000:
                self._allowed.clear()
                self._refused.clear()
            if why is None:
                self._allowed[peer] = now
                self._refused.pop(peer, None)
            else:
                self._refused[peer] = (now, why)
        if why is not None:
            log.info("refused peer %s: %s", peer, why)
        return why

    def _pod(self, name: str) -> dict[str, Any] | None:
        core = client.CoreV1Api(self.api)
        try:
            return dict(
                self.api.sanitize_for_serialization(
                    core.read_namespaced_pod(name, self.me.namespace)
                )
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _current_groups(self, fresh: bool = False) -> list[tuple[str, list[dict[str, Any]]]]:
        now = self.clock()
        with self._lock:
            if not fresh and self._groups is not None and now - self._groups[0] < CACHE_S:
                return self._groups[1]
        got = groups(
            self._list(WeightSource.PLURAL),
            self._list(RefitJob.PLURAL),
            self._list(ArtifactCache.PLURAL),
        )
        with self._lock:
            self._groups = (now, got)
        return got

    def _list(self, plural: str) -> list[dict[str, Any]]:
        got = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, self.me.namespace, plural
        )
        return list(cast(dict[str, Any], got)["items"])

    def _decide(self, peer: PodIdentity, fresh: bool = False) -> str | None:
        theirs = self._pod(peer.pod)
        why = refusal(theirs, peer)
        if why or theirs is None:
            return why
        ours = self._pod(self.me.pod) or {}
        mine = (ours.get("metadata") or {}).get("labels") or {}
        their_labels = (theirs.get("metadata") or {}).get("labels") or {}
        if related(mine, their_labels, self._current_groups(fresh)) is None:
            return (
                "not a member of a WeightSource we share, nor a target of a RefitJob on "
                "one, nor of an ArtifactCache we share"
            )
        return None
