"""Reshard pulls with real NIXL transfers: source TP ranks are real agent processes,
the target is an in-process Agent running ReshardPuller (host memory here, CUDA on
the accelerator machine). Every cycle's result must equal a fresh direct load."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "transform"))

from reshard_sim import direct_load, full_weights, model, shard_specs  # noqa: E402

from ferry_agent.agent import Agent, AgentConfig  # noqa: E402
from ferry_agent.client import EngineClient  # noqa: E402
from ferry_agent.procs import spawn_agent  # noqa: E402
from ferry_agent.transform.reshard_pull import ReshardPuller  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
MEMORY = [
    "host",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Sources:
    """TP ranks as agent processes; the test plays their engines through EngineClient."""

    def __init__(self, tmp: Path, token: Path, tp: int, memory: str):
        args = ["--memory", memory, "--slab-bytes", "1Mi", "--log-level", "WARNING"]
        self.procs = [
            spawn_agent(tmp, f"src-{r}", token, args=[*args, "--device", "0"]) for r in range(tp)
        ]
        self.clients = [EngineClient(p.socket) for p in self.procs]
        self.tp = tp

    @property
    def endpoints(self) -> list[str]:
        return [p.endpoint for p in self.procs]

    def load(self, shapes: dict, full: dict, version: str) -> None:
        for r, c in enumerate(self.clients):
            views = c.declare(shard_specs(shapes, r, self.tp))
            c.begin_write()
            for name, w in direct_load(full, r, self.tp).items():
                views[name].copy_(w)
            if HAS_CUDA:
                torch.cuda.synchronize()
            c.publish(version)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for p in self.procs:
            p.stop()


def _target(pod: str, token: str, memory: str) -> Agent:
    dev = torch.cuda.device_count() - 1 if memory == "cuda" else 0
    cfg = AgentConfig(
        pod=pod, token=token, grpc_host="127.0.0.1", memory=memory, device=dev, slab_bytes=1 << 20
    )
    return Agent(cfg).start()


def _check(agent: Agent, full: dict, rank: int, tp: int) -> None:
    want = direct_load(full, rank, tp)
    got = agent.views()
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), name
        assert torch.equal(g.cpu().view(torch.uint8), w.view(torch.uint8)), name


def _poison(agent: Agent) -> None:
    for t in agent.views().values():
        t.view(torch.uint8).fill_(0xAB)


@pytest.mark.parametrize("memory", MEMORY)
def test_tp2_to_tp1_three_refits_each_equal_a_fresh_load(tmp_path, memory):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    src = Sources(tmp_path, token, 2, memory)
    dst = _target("tgt", token.read_text(), memory)
    puller = ReshardPuller(dst, target_rank=0, target_tp=1)
    try:
        small, big = model(hidden=256, inter=384), model(hidden=384, inter=512, layers=3)
        # cycles 1 and 2: same layout, new values; cycle 3: a different model shape
        for cycle, shapes in ((1, small), (2, small), (3, big)):
            full = full_weights(shapes, seed=100 + cycle)
            src.load(shapes, full, f"step-{cycle}")
            dst.declare(shard_specs(shapes, 0, 1))  # no-op while the layout is unchanged
            _poison(dst)
            res = puller.pull(src.endpoints, version=f"step-{cycle}", timeout_s=120)
            assert res.version == f"step-{cycle}" and dst.version_info()["version"] == res.version
            assert res.replanned == (cycle != 2)
            assert res.scratch_pieces > 0 and res.direct_pieces > 0
            if cycle == 2:
                assert res.stats["dlists_prepared"] == 0 and res.stats["registrations"] == 0
            _check(dst, full, 0, 1)
    finally:
        puller.close()
        dst.close()
        src.close()


@pytest.mark.parametrize("memory", MEMORY)
def test_tp1_to_tp2_each_rank_gets_its_shard(tmp_path, memory):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    src = Sources(tmp_path, token, 1, memory)
    targets = [_target(f"tgt-{r}", token.read_text(), memory) for r in range(2)]
    pullers = [ReshardPuller(t, target_rank=r, target_tp=2) for r, t in enumerate(targets)]
    try:
        shapes = model()
        for cycle in (1, 2):
            full = full_weights(shapes, seed=200 + cycle)
            src.load(shapes, full, f"v{cycle}")
            for r, (t, p) in enumerate(zip(targets, pullers, strict=True)):
                t.declare(shard_specs(shapes, r, 2))
                _poison(t)
                res = p.pull(src.endpoints, timeout_s=120)
                assert res.version == f"v{cycle}"
                _check(t, full, r, 2)
    finally:
        for p in pullers:
            p.close()
        for t in targets:
            t.close()
        src.close()
