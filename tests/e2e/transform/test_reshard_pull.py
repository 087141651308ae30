"""Reshard pulls with real NIXL transfers: source TP ranks are real agent processes,
the target is an in-process Agent asked for reshard pulls (host memory here, CUDA on
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
from ferry_agent.request import PullRequest, Reshard  # noqa: E402
from ferry_dev.procs import spawn_agent  # noqa: E402

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
        pod=pod,
        token=token,
        grpc_host="127.0.0.1",
        memory=memory,
        devices=(dev,),
        slab_bytes=1 << 20,
    )
    return Agent(cfg).start()


def _reshard(endpoints: list[str], rank: int, tp: int, **fields) -> PullRequest:
    return PullRequest(endpoints, reshard=Reshard(rank, tp), timeout_s=120, **fields)


def _check(agent: Agent, full: dict, rank: int, tp: int) -> None:
    want = direct_load(full, rank, tp)
    got = agent.rank(0).views()
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), name
        assert torch.equal(g.cpu().view(torch.uint8), w.view(torch.uint8)), name


def _poison(agent: Agent) -> None:
    for t in agent.rank(0).views().values():
        t.view(torch.uint8).fill_(0xAB)


@pytest.mark.parametrize("memory", MEMORY)
def test_tp2_to_tp1_three_refits_each_equal_a_fresh_load(tmp_path, memory):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    src = Sources(tmp_path, token, 2, memory)
    dst = _target("tgt", token.read_text(), memory)
    try:
        small, big = model(hidden=256, inter=384), model(hidden=384, inter=512, layers=3)
        # cycles 1 and 2: same layout, new values; cycle 3: a different model shape
        for cycle, shapes in ((1, small), (2, small), (3, big)):
            full = full_weights(shapes, seed=100 + cycle)
            src.load(shapes, full, f"step-{cycle}")
            dst.rank(0).declare(shard_specs(shapes, 0, 1))  # no-op while the layout is unchanged
            _poison(dst)
            res = dst.pull(_reshard(src.endpoints, 0, 1, version=f"step-{cycle}"))
            assert (
                res.version == f"step-{cycle}"
                and dst.rank(0).version_info()["version"] == res.version
            )
            assert res.details["replanned"] == (cycle != 2)
            assert res.details["scratch_pieces"] > 0 and res.details["direct_pieces"] > 0
            if cycle == 2:
                assert res.stats["dlists_prepared"] == 0 and res.stats["registrations"] == 0
            _check(dst, full, 0, 1)
    finally:
        dst.close()
        src.close()


@pytest.mark.parametrize("memory", MEMORY)
def test_tp1_to_tp2_each_rank_gets_its_shard(tmp_path, memory):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    src = Sources(tmp_path, token, 1, memory)
    targets = [_target(f"tgt-{r}", token.read_text(), memory) for r in range(2)]
    try:
        shapes = model()
        for cycle in (1, 2):
            full = full_weights(shapes, seed=200 + cycle)
            src.load(shapes, full, f"v{cycle}")
            for r, t in enumerate(targets):
                t.rank(0).declare(shard_specs(shapes, r, 2))
                _poison(t)
                res = t.pull(_reshard(src.endpoints, r, 2))
                assert res.version == f"v{cycle}"
                _check(t, full, r, 2)
    finally:
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
    cfg = AgentConfig(
        pod="tgt",
        token=token.read_text(),
        grpc_host="127.0.0.1",
        memory="host",
        slab_bytes=1 << 20,
        control_socket=str(tmp_path / "tgt.sock"),
    )
    dst = Agent(cfg).start()
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
        res = dst.pull(
            _reshard(src.endpoints, 0, 1, quiesce=True, chunk_bytes=1 << 16), progress=seen.append
        )
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
            dst.pull(
                _reshard(src.endpoints, 0, 1, quiesce=True, chunk_bytes=1 << 16, max_gbps=0.0005),
                cancel=cancel,
            )
        assert time.monotonic() - t0 < 2.0, "cancel must land within a check interval or two"
        assert dst.rank(0).version_info()["version"] == ""
        _until(lambda: len(events) == 4)
        assert events[2:] == [("paused", "v2"), ("resumed", "", False)]  # slabs hold no version
        # and the next cycle (plan reused) still equals a fresh load
        res = dst.pull(_reshard(src.endpoints, 0, 1, quiesce=True, chunk_bytes=1 << 16))
        assert not res.details["replanned"] and res.version == "v2"
        _check(dst, full_weights(shapes, seed=8), 0, 1)
    finally:
        stop.set()
        engine.join(5)
        dst.close()
        src.close()


# Issue 15: the source's two TP ranks live in one pod (one agent process serving local
# ranks 0 and 1, host memory simulating the GPUs); two TP1 pods each build the full
# tensors from both ranks, addressed host:port/r.
def test_a_tp2_pod_is_resharded_into_two_tp1_pods(tmp_path):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    pod = spawn_agent(
        tmp_path,
        "src-pod",
        token,
        args=["--ranks", "2", "--slab-bytes", "1Mi", "--log-level", "WARNING"],
    )
    workers = [EngineClient(pod.socket, rank=r) for r in range(2)]
    targets = [_target(f"tp1-{i}", token.read_text(), "host") for i in range(2)]
    try:
        shapes = model()
        for cycle in (1, 2):
            full = full_weights(shapes, seed=300 + cycle)
            for r, c in enumerate(workers):  # each engine worker publishes its rank's shard
                views = c.declare(shard_specs(shapes, r, 2))
                c.begin_write()
                for name, w in direct_load(full, r, 2).items():
                    views[name].copy_(w)
                c.publish(f"v{cycle}")
            sources = [pod.endpoint, f"{pod.endpoint}/1"]
            for t in targets:
                t.rank(0).declare(shard_specs(shapes, 0, 1))
                _poison(t)
                res = t.pull(_reshard(sources, 0, 1, version=f"v{cycle}"))
                assert res.version == f"v{cycle}"
                assert len(res.source_bytes) == 2 and all(res.source_bytes.values()), (
                    res.source_bytes
                )
                _check(t, full, 0, 1)
    finally:
        for t in targets:
            t.close()
        for c in workers:
            c.close()
        pod.stop()
