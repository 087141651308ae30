"""What a pod's agent of several local ranks reports as its one WeightSource entry: a
real Agent (host memory, real NIXL agents per rank), its ranks declared and published
the way engine workers do, read back through runtime.agent_info and the entry model."""

from __future__ import annotations

import pytest

from ferry_agent.agent import Agent, AgentConfig
from ferry_agent.errors import LayoutTooLarge
from ferry_agent.k8s.runtime import agent_info
from ferry_agent.layout import TensorSpec
from ferry_api.ranks import combined
from ferry_api.weightsource import ReplicaStatus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def specs(n: int) -> list[TensorSpec]:
    return [TensorSpec("w", "float32", (n,))]


def entry(agent: Agent) -> ReplicaStatus:
    return ReplicaStatus.model_validate(
        {"pod": "p", **{k: v for k, v in agent_info(agent).items() if v is not None}}
    )


def test_two_ranks_report_one_compact_entry_and_a_failed_rank_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FERRY_TP_RANK", raising=False)
    agent = Agent(
        AgentConfig(
            pod="rank-report", token="t", devices=(0, 1), slab_bytes=1 << 20, max_slab_bytes=1 << 20
        )
    )
    try:
        for r, n in enumerate((1024, 2048)):
            agent.rank(r).declare(specs(n))
            agent.rank(r).begin_write()
            agent.rank(r).publish("v1")
        e = entry(agent)
        fps = {r: agent.rank(r).version_info()["fingerprint"] for r in range(2)}
        assert e.state == "Ready" and e.version == "v1" and e.local_ranks == 2 and e.ranks is None
        assert e.fingerprint == combined(fps) and e.bytes == 4 * (1024 + 2048) and e.tensors == 2

        agent.rank(1).begin_write()
        agent.rank(1).publish("v2")  # ranks disagree: not Ready, the odd one listed
        e = entry(agent)
        assert e.state == "Loading" and [(r.local_rank, r.version) for r in e.ranks or []] == [
            (1, "v2")
        ]

        with pytest.raises(LayoutTooLarge):
            agent.rank(1).declare(specs(1 << 20))  # 4 MiB: past the agent's 1 MiB limit
        e = entry(agent)
        assert e.state == "Failed" and e.reason == "LayoutTooLarge"
        (bad,) = e.ranks or []
        assert bad.local_rank == 1 and bad.rank == 1 and bad.state == "Failed" and bad.message
        agent.rank(1).declare(specs(2048))  # a declare that succeeds clears it
        assert entry(agent).state != "Failed"
    finally:
        agent.close()
