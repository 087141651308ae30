"""Connect a running Agent to the control plane: its Lease + entry, and its assignments.

Enabled when the agent runs in a cluster (service-account credentials) or a
kubeconfig is given (the local dev cluster and tests).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

from .artifacts import ArtifactAgent
from .jobs import JobRunner
from .reporter import Identity, Reporter

log = logging.getLogger(__name__)


def enabled(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ if env is None else env)
    if env.get("FERRY_KUBE", "auto") == "off":
        return False
    return bool(env.get("KUBERNETES_SERVICE_HOST") or env.get("KUBECONFIG"))


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


def agent_info(agent: Any) -> dict[str, Any]:
    """What the replica entry reports, read from the agent's own state."""
    info: dict[str, Any] = {"state": agent.state}
    v = agent.version_info()
    info["version"] = v.get("version") or None
    info["fingerprint"] = v.get("fingerprint") or None
    try:
        layout = agent.layout
        info["tensors"] = len(layout.placements)
        info["bytes"] = layout.nbytes
    except Exception:  # nothing declared yet
        pass
    rank = os.environ.get("FERRY_TP_RANK")
    if rank and rank.isdigit():
        info["rank"] = int(rank)
    return info


@dataclass
class KubeLink:
    reporter: Reporter
    jobs: JobRunner
    artifacts: ArtifactAgent | None

    def stop(self) -> None:
        # Jobs first (cancel pulls), then the reporter: Stale is the last word.
        self.jobs.stop()
        if self.artifacts is not None:
            self.artifacts.stop()
        self.reporter.stop()


def prepare(agent: Any) -> ArtifactAgent | None:
    """Before agent.start(): what must be registered with the agent's gRPC server."""
    return ArtifactAgent(agent) if enabled() else None


def attach(
    agent: Any,
    pod: str,
    namespace: str,
    node: str | None,
    endpoint: str,
    lease_seconds: int = 15,
    renew_seconds: float = 5.0,
    artifacts: ArtifactAgent | None = None,
) -> KubeLink:
    api = api_client()
    ident = Identity(pod, namespace, node, endpoint)
    reporter = Reporter(ident, lambda: agent_info(agent), api, lease_seconds, renew_seconds).start()
    jobs = JobRunner(agent, ident, api, on_done=reporter.poke).start()
    if artifacts is not None:
        artifacts.bind(ident, api).start()
    log.info("reporting to the control plane as %s/%s (%s)", namespace, pod, endpoint)
    return KubeLink(reporter, jobs, artifacts)
