"""The torch layer (ferry_agent.engines) between real agent processes, host memory.

A trainer module publishes through the source agent; the target agent pulls it over
NIXL (RPC pull, engine paused first); the engine's module is bound to the target's
slabs by a RefitHandler running the handshake in its background thread.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from engine_models import IDS, Tiny, state_equal, step, trained
from torch import nn

from ferry_agent.engines import (
    BoundModule,
    ModulePublisher,
    RefitHandler,
    SharedStorageError,
    module_layout,
)
from ferry_agent.errors import Cancelled, EngineNotQuiesced, LayoutMismatch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_tied_weights_declared_once_and_still_tied_after_bind(agents):
    trainer = trained(1)
    pub = ModulePublisher(agents.engine("src"), trainer)
    names = [p.name for p in pub.client.placements]
    assert "embed.weight" in names and "head.weight" not in names, names
    assert "cache" not in names and "scale" in names
    assert pub.layout.by_name()["embed.weight"].aliases == ("head.weight",)
    pub.publish("v1")

    engine = trained(2)
    assert engine.head.weight is engine.embed.weight
    with RefitHandler(agents.engine("dst"), engine) as refits:
        agents.pull()
        state = refits.wait(lambda s: s.version == "v1", timeout=10)
        assert state.condition == "Serving" and state.ok
        views = refits.client.tensors
        assert engine.head.weight is engine.embed.weight
        assert engine.head.weight.data_ptr() == views["embed.weight"].data_ptr()
        assert state_equal(engine, trainer)
        with refits.reading(), torch.no_grad():
            assert torch.equal(engine(IDS), trainer(IDS))


def test_addresses_stable_across_three_refits(agents):
    trainer = trained(1)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    pub = ModulePublisher(agents.engine("src"), trainer)
    declared = pub.client.status()["generation"]
    engine = trained(2)
    with RefitHandler(agents.engine("dst"), engine) as refits:
        addresses = None
        for k in range(1, 4):
            step(trainer, opt)
            pub.publish(f"step-{k}")
            agents.pull()
            state = refits.wait(lambda s, k=k: s.version == f"step-{k}", timeout=10)
            assert not state.moved
            bound = BoundModule(refits.client, engine).addresses()
            addresses = addresses or bound
            assert bound == addresses, f"addresses changed at refit {k}"
            with refits.reading(), torch.no_grad():
                assert torch.equal(engine(IDS), trainer(IDS)), f"refit {k}"
        assert refits.state.refits == 3
    assert pub.client.status()["generation"] == declared, "a publish re-declared the layout"


def test_publish_refuses_a_module_whose_layout_changed(agents):
    trainer = trained(1)
    pub = ModulePublisher(agents.engine("src"), trainer)
    pub.publish("v1")
    trainer.proj = nn.Linear(32, 40)
    with pytest.raises(
        LayoutMismatch, match=r"proj.weight: shape \[32, 32\] on the declared layout"
    ):
        pub.publish("v2")
    status = pub.client.status()
    assert (status["version"], status["state"]) == ("v1", "Ready"), "nothing may be written"


def test_double_buffer_swap_repoints_the_weights_and_says_so(agents):
    trainer = trained(1)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    pub = ModulePublisher(agents.engine("src"), trainer)
    pub.publish("v1")
    agents.pull()
    engine = trained(2)
    with RefitHandler(agents.engine("dst"), engine) as refits:  # binds v1 at start
        assert refits.state.version == "v1"
        before = BoundModule(refits.client, engine).addresses()
        step(trainer, opt)
        pub.publish("v2")
        agents.pull(double_buffer=True)
        state = refits.wait(lambda s: s.version == "v2", timeout=10)
        assert state.moved and "other slab set" in state.detail, state
        assert BoundModule(refits.client, engine).addresses() != before
        assert engine.head.weight is engine.embed.weight
        assert state_equal(engine, trainer)


class Renamed(nn.Module):
    """The trainer's names differ from the served model's, and it has a value head
    the served model lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Tiny()
        self.value_head = nn.Linear(32, 1)


def test_name_map_and_filter(agents):
    torch.manual_seed(3)
    trainer = Renamed()
    pub = ModulePublisher(
        agents.engine("src"),
        trainer,
        rename=lambda name: name.removeprefix("backbone."),
        include=lambda name: not name.startswith("value_head."),
    )
    assert sorted(pub.layout.by_name()) == sorted(module_layout(Tiny()).by_name())
    pub.publish("v1")
    engine = trained(2)
    with RefitHandler(agents.engine("dst"), engine) as refits:
        agents.pull()
        refits.wait(lambda s: s.version == "v1", timeout=10)
        assert state_equal(engine, trainer.backbone)


def test_dtype_cast_on_publish(agents):
    trainer = trained(1)  # float32 master weights
    pub = ModulePublisher(agents.engine("src"), trainer, dtype=torch.bfloat16)
    dtypes = {p.name: p.dtype for p in pub.client.placements}
    assert dtypes["embed.weight"] == "bfloat16" and dtypes["scale"] == "bfloat16"
    assert dtypes["positions"] == "int64", "integer buffers keep their dtype"
    pub.publish("v1")
    engine = trained(2, dtype=torch.bfloat16)
    with RefitHandler(agents.engine("dst"), engine) as refits:
        agents.pull()
        refits.wait(lambda s: s.version == "v1", timeout=10)
        served = trained(1).to(torch.bfloat16)
        assert state_equal(engine, served)
        assert engine.embed.weight.dtype == torch.bfloat16


def test_mismatched_module_refused_with_differences_named_and_nothing_written(agents):
    trainer = trained(1)
    ModulePublisher(agents.engine("src"), trainer).publish("v1")
    agents.pull()
    client = agents.engine("dst")
    slabs_before = {n: t.clone() for n, t in client.attach().items()}
    odd = trained(2, tied=False)
    odd.proj = nn.Linear(32, 48)
    own = {n: (t.data_ptr(), t.clone()) for n, t in odd.state_dict().items()}
    refits = RefitHandler(client, odd)
    with pytest.raises(LayoutMismatch) as err:
        refits.start()
    msg = str(err.value)
    assert "does not match the module" in msg, msg
    assert "3 differences" in msg, msg
    assert "proj.weight: shape [32, 32] on the agent's slabs != [48, 32] on the module" in msg, msg
    assert "proj.bias: shape [32] on the agent's slabs != [48] on the module" in msg, msg
    assert "head.weight: missing on the agent's slabs" in msg, msg
    assert len(err.value.differences) == 3
    for name, (ptr, values) in own.items():
        t = odd.state_dict()[name]
        assert t.data_ptr() == ptr and torch.equal(t, values), f"{name} was touched"
    for name, t in client.attach().items():
        assert torch.equal(t, slabs_before[name]), f"slab tensor {name} was written"
    refits.stop()


def test_overlapping_views_are_refused_on_publish(agents):
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Parameter(torch.randn(12, 4))
            self.q = nn.Parameter(self.qkv.data[:4])  # overlaps qkv, a different view

    with pytest.raises(SharedStorageError, match="q and qkv share memory"):
        ModulePublisher(agents.engine("src"), Fused())


def test_pause_and_resume_callbacks_bracket_the_pull(agents):
    trainer = trained(1)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    pub = ModulePublisher(agents.engine("src"), trainer)
    pub.publish("v1")
    agents.pull()
    engine = trained(2)
    events: list[tuple[str, float, object]] = []
    rpc = agents.rpc("dst")
    with RefitHandler(agents.engine("dst"), engine) as refits:
        v1 = engine.embed.weight.detach().clone()
        refits.on_pause(lambda: events.append(("pause", time.time(), rpc.health().state)))
        refits.on_resume(
            lambda version, ok: events.append(
                ("resume", time.time(), (version, ok, engine.embed.weight.detach().clone()))
            )
        )
        reads: list[tuple[float, float]] = []
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                with refits.reading():
                    t0 = time.time()
                    with torch.no_grad():
                        engine(IDS)
                    reads.append((t0, time.time()))

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        step(trainer, opt)
        pub.publish("v2")
        t_pull = time.time()
        agents.pull()
        t_pulled = time.time()
        state = refits.wait(lambda s: s.version == "v2", timeout=10)
        time.sleep(0.2)
        stop.set()
        server.join(5)
    kinds = [e[0] for e in events]
    assert kinds == ["pause", "resume"], events
    (_, t_pause, agent_state), (_, t_resume, (version, ok, seen)) = events
    assert agent_state != "Pulling", "the agent wrote before the engine paused"
    # pause callback -> readers drained -> ack -> pull -> state settled -> resume callback
    assert t_pull <= t_pause <= state.paused_at < state.resumed_at <= t_resume <= t_pulled + 1
    assert (version, ok) == ("v2", True)
    assert not torch.equal(seen, v1) and torch.equal(seen, trainer.embed.weight.detach())
    inside = [r for r in reads if r[0] < state.resumed_at and r[1] > state.paused_at]
    assert not inside, f"the serving loop read weights during the pull: {inside[:3]}"
    assert any(r[0] < t_pause for r in reads) and any(r[0] >= t_resume for r in reads)


def test_failed_pull_resumes_not_ok_and_states_what_the_weights_hold(agents):
    # 256x1024 float32 embedding (tied) + small rest: ~1 MiB per tensor, several chunks.
    trainer = trained(1, vocab=4096, dim=256)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    pub = ModulePublisher(agents.engine("src"), trainer)
    pub.publish("v1")
    agents.pull()
    engine = trained(2, vocab=4096, dim=256)
    resumes: list[tuple[str, bool]] = []
    with RefitHandler(
        agents.engine("dst"), engine, resume=lambda v, ok: resumes.append((v, ok))
    ) as refits:
        assert refits.state.version == "v1"
        step(trainer, opt)
        pub.publish("v2")

        # 1. The engine does not let go of its weights in time: nothing is written.
        def hold() -> None:
            with refits.reading():
                time.sleep(1.5)

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.1)
        with pytest.raises(EngineNotQuiesced):
            agents.pull(quiesce_timeout_s=0.5)
        holder.join()
        state = refits.wait(lambda s: s.refits == 1, timeout=10)
        assert resumes[-1] == ("v1", False)
        assert (state.condition, state.version, state.wanted) == ("Unchanged", "v1", "v2"), state
        with torch.no_grad():
            assert torch.equal(engine(IDS), trained(1, vocab=4096, dim=256)(IDS))

        # 2. The pull is cancelled mid-write: the weights are partial, no version held.
        cancel = threading.Event()
        threading.Timer(1.0, cancel.set).start()
        with pytest.raises(Cancelled):
            agents.pull(max_gbps=0.001, cancel=cancel)
        state = refits.wait(lambda s: s.refits == 2, timeout=10)
        assert resumes[-1] == ("", False)
        assert (state.condition, state.version, state.ok) == ("Partial", "", False), state
        assert "partial" in state.detail
        assert agents.engine("dst").status()["version"] == ""

        # 3. The next pull succeeds: serving again, at the same addresses.
        agents.pull()
        state = refits.wait(lambda s: s.refits == 3, timeout=10)
        assert resumes[-1] == ("v2", True) and state.condition == "Serving"
        assert state_equal(engine, trainer)


def test_meta_module_binds_without_allocating_its_weights(agents):
    trainer = trained(1)
    ModulePublisher(agents.engine("src"), trainer).publish("v1")
    agents.pull()
    with torch.device("meta"):
        engine = Tiny()
    with RefitHandler(agents.engine("dst"), engine) as refits:
        assert refits.state.version == "v1"
        assert engine.head.weight is engine.embed.weight
        assert engine.embed.weight.device.type == "cpu"
        engine.cache = torch.zeros(4)  # non-persistent: the model's own to make
        assert state_equal(engine, trainer)


@pytest.mark.parametrize("world", [2])
def test_fsdp2_dtensor_module_published_tensor_by_tensor(agents, tmp_path, world):
    """An FSDP2 trainer (gloo process group, CPU) publishes its full tensors from rank 0;
    the target binds them like any module's."""
    import subprocess
    import sys
    from pathlib import Path

    from ferry_dev.controlplane import free_port

    worker = Path(__file__).with_name("fsdp_worker.py")
    out = tmp_path / "full"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(r),
                str(world),
                port,
                agents.procs["src"].socket,
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=150)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    engine = trained(2, vocab=90, dtype=torch.bfloat16)
    with RefitHandler(agents.engine("dst"), engine) as refits:
        agents.pull()
        refits.wait(lambda s: s.version == "v2", timeout=10)
        want = torch.load(f"{out}.v2")
        got = engine.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert not torch.equal(want["embed.weight"], torch.load(f"{out}.v1")["embed.weight"])
        assert engine.head.weight is engine.embed.weight
