"""The agent's side of the control plane: its Lease, its own status entries, its assignments.

Nothing here is imported unless the agent runs in a cluster (or is given a kubeconfig):
`ferry agent run` on a plain host needs neither the Kubernetes client nor the artifact
crypto (tests/e2e/agent/test_agent_standalone.py).
"""

from __future__ import annotations

import os


def enabled(env: dict[str, str] | None = None) -> bool:
    """Report to a control plane: in a cluster (service-account credentials) or given a
    kubeconfig, unless FERRY_KUBE=off."""
    env = dict(os.environ if env is None else env)
    if env.get("FERRY_KUBE", "auto") == "off":
        return False
    return bool(env.get("KUBERNETES_SERVICE_HOST") or env.get("KUBECONFIG"))
