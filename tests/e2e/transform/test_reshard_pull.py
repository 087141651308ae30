"""Reshard pulls with real NIXL transfers: source TP ranks are real agent processes,
the target is an in-process Agent running ReshardPuller (host memory here, CUDA on
the accelerator machine). Every cycle's result must equal a fresh direct load."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "transform"))

from reshard_sim import direct_load, full_weights, model, shard_specs  # noqa: E402

from ferry_agent.agent import Agent, AgentConfig  # noqa: E402
from ferry_agent.client import EngineClient  # noqa: E402
from ferry_agent.errors import Cancelled  # noqa: E402
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


def _engine(socket: str, events: list, stop) -> None:
    """An engine that acknowledges every pause and records how each refit ended."""
    with EngineClient.connect(socket) as c:
        c.subscribe()
        while not stop.is_set():
            refit = c.wait_refit(timeout=0.02)
            if refit is not None:
                refit.ack()
                events.append(("paused", refit.version))
                events.append(("resumed", *refit.wait_done(timeout=60)))


def _until(fn, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_fresh_target_adopts_its_shard_pauses_the_engine_and_reports_progress(tmp_path):
    import threading

    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    src = Sources(tmp_path, token, 2, "host")
    cfg = AgentConfig(pod="tgt", token=token.read_text(), grpc_host="127.0.0.1", memory="host",
                      slab_bytes=1 << 20, control_socket=str(tmp_path / "tgt.sock"))
    dst = Agent(cfg).start()
    puller = ReshardPuller(dst, target_rank=0, target_tp=1)
    events: list = []
    stop = threading.Event()
    engine = threading.Thread(target=_engine, args=(cfg.control_socket, events, stop), daemon=True)
    try:
        shapes = model()
        full = full_weights(shapes, seed=7)
        src.load(shapes, full, "v1")
        engine.start()
        time.sleep(0.3)  # the engine subscribed
        seen: list[int] = []
        res = puller.pull(src.endpoints, timeout_s=120, quiesce=True, chunk_bytes=1 << 16,
                          progress=seen.append)
        _check(dst, full, 0, 1)  # no layout before: it declared exactly the TP1 shapes
        _until(lambda: len(events) == 2)
        assert events == [("paused", "v1"), ("resumed", "v1", True)]
        assert seen and seen == sorted(seen) and seen[-1] == res.bytes
        assert res.stats["registrations"] >= 1

        # A slow pull, cancelled: READs aborted, no version served, engine resumed ok=False.
        src.load(shapes, full_weights(shapes, seed=8), "v2")
        cancel = threading.Event()
        threading.Timer(0.4, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            puller.pull(src.endpoints, timeout_s=120, quiesce=True, chunk_bytes=1 << 16,
                        cancel=cancel, max_gbps=0.0005)
        assert time.monotonic() - t0 < 2.0, "cancel must land within a check interval or two"
        assert dst.version_info()["version"] == ""
        _until(lambda: len(events) == 4)
        assert events[2:] == [("paused", "v2"), ("resumed", "v2", False)]
        # and the next cycle (plan reused) still equals a fresh load
        res = puller.pull(src.endpoints, timeout_s=120, quiesce=True, chunk_bytes=1 << 16)
        assert not res.replanned and res.version == "v2"
        _check(dst, full_weights(shapes, seed=8), 0, 1)
    finally:
        stop.set()
        engine.join(5)
        puller.close()
        dst.close()
        src.close()
