"""Refit a local cluster's targets to a version, and say where the time went.

A `Refitter` moves a published version into the targets; `RefitJobRefitter` does it
the one-shot way (a RefitJob per version through the operator). A continuous
refit (targets following the source's latest version) is another Refitter with
the same `refit(version)`, so loops such as examples/rl do not change with it.

Times are wall clock (`time.time()`, one machine): the READ time of each target's
pull is what its agent reports (`ferry_agent_transfer_seconds`, the NIXL READs of
its pulls), read from its /metrics before and after.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import client as k8s_client

from . import manifests

GROUP, VERSION = "ferry.dev", "v1alpha1"
_READ_SUM = re.compile(r"^ferry_agent_transfer_seconds_sum\s+(\S+)$", re.M)


def weightsource(
    name: str, selector: dict[str, str], model: str, memory: str = "host"
) -> dict[str, Any]:
    return manifests.weightsource(name, selector, model, memory=memory)


def refitjob(
    name: str,
    source: str,
    targets: dict[str, str],
    version: str,
    pause: str = "engine",
    timeout_s: int = 120,
) -> dict[str, Any]:
    return manifests.refitjob(
        name,
        source,
        targets,
        version=version,
        pause={"mode": pause, "timeoutSeconds": 30},
        timeoutSeconds=timeout_s,
        ttlSecondsAfterFinished=60,
    )


def read_seconds(metrics_port: int) -> float:
    """Seconds of NIXL READs this agent's pulls took so far (its own counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = _READ_SUM.search(text)
    return float(m.group(1)) if m else 0.0


@dataclass
class RefitTiming:
    version: str
    created_at: float  # the refit was asked for (RefitJob created)
    complete_at: float  # the control plane said every target holds it (condition Complete)
    read_s: dict[str, float] = field(default_factory=dict)  # per target: its pull's READ time
    phase: str = ""

    @property
    def data_s(self) -> float:
        """The slowest target's READs (targets pull in parallel)."""
        return max(self.read_s.values(), default=0.0)


class Refitter(Protocol):
    def refit(self, version: str) -> RefitTiming: ...


class RefitJobRefitter:
    """One RefitJob per version; returns once the job is Complete (or Failed)."""

    def __init__(
        self,
        api: k8s_client.ApiClient,
        namespace: str,
        source: str,
        targets: dict[str, str],
        target_metrics: Sequence[tuple[str, int]],
        pause: str = "engine",
        prefix: str = "refit",
        poll_s: float = 0.05,
    ):
        self.api = k8s_client.CustomObjectsApi(api)
        self.namespace, self.source, self.targets = namespace, source, targets
        self.target_metrics = list(target_metrics)  # (pod, metrics port)
        self.pause, self.prefix, self.poll_s = pause, prefix, poll_s
        self.count = 0

    def refit(self, version: str, timeout_s: float = 180) -> RefitTiming:
        self.count += 1
        name = f"{self.prefix}-{self.count}-{re.sub(r'[^a-z0-9-]', '-', version.lower())}"[:63]
        before = {pod: read_seconds(port) for pod, port in self.target_metrics}
        body = refitjob(name, self.source, self.targets, version, self.pause)
        created = time.time()
        self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "refitjobs", body)
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "refitjobs", name
            )
            phase = (job.get("status") or {}).get("phase", "")
            if phase in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"RefitJob {name} not finished in {timeout_s:g}s: {job.get('status')}"
                )
            time.sleep(self.poll_s)
        complete = time.time()
        after = {pod: read_seconds(port) for pod, port in self.target_metrics}
        timing = RefitTiming(
            version, created, complete, {p: after[p] - before[p] for p in after}, phase
        )
        if phase != "Succeeded":
            raise RuntimeError(f"RefitJob {name} failed: {job.get('status')}")
        return timing
