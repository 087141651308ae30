"""SGLang through Ferry, against the real sglang package (its own environment: SGLang
pins its own torch; hack/setup-sglang.sh builds it once, `make test` runs it).

Real agents (host memory, NIXL over loopback) hold a tiny HF Qwen2 checkpoint a trainer
published; an SGLang process (sglang_worker.py, Ferry's agent installed so its entry
point is there) loads Ferry's plugin with SGLang's own plugin loader, gets Ferry's loader
from SGLang's own get_model_loader, cold-starts a real SGLang Qwen2ForCausalLM on CPU from
the target agent's slab views, and refits it through SGLang's weight-update session; the
parameters must equal SGLang's own loading of the same checkpoint, bit for bit.

Stubbed, test-only (named in sglang_worker.py): sgl_kernel's architecture-specific op
loading, which needs libcuda. Not run here (no GPU): SGLang's HTTP server and scheduler
loop (pause/continue are checked against SGLang's request types, not executed), forward
passes, CUDA slabs and CUDA IPC: tests/gpu/test_sglang_cuda.py runs those on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ferry_agent.engines import ModulePublisher
from ferry_agent.errors import EngineNotQuiesced

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("sglang_worker.py")
CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def sglang_python() -> str:
    py = os.environ.get("FERRY_SGLANG_PYTHON")
    if py is not None:  # make test: the last line hack/setup-sglang.sh printed
        if not Path(py).is_file():
            pytest.skip(f"hack/setup-sglang.sh did not build SGLang's environment: {py!r}")
        return py
    out = subprocess.run(
        [str(ROOT / "hack/setup-sglang.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "FERRY_SGLANG_CHECK_ONLY": "1"},
    )
    path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    if not path or not Path(path).is_file():
        pytest.skip("SGLang's environment is not built: run hack/setup-sglang.sh (make test does)")
    return path


class Worker:
    def __init__(self, py: str):
        self.proc = subprocess.Popen(
            [py, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the SGLang worker exited ({self.proc.poll()})"
        return line

    def __call__(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        assert out.pop("ok"), f"{op}: {out.get('error')}\n{out.get('trace', '')}"
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Trainer:
    """An HF Qwen2 (bf16) that saves each version as a checkpoint and publishes it."""

    def __init__(self, root: Path, agents: Any):
        from ferry_agent.engines.hf import model_from_config

        self.root = root
        self.model = model_from_config(CONFIG, dtype=torch.bfloat16, seed=1)
        self.pub = ModulePublisher(agents.engine("src"), self.model)

    def step(self, k: int) -> None:
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * k)

    def publish(self, version: str) -> str:
        ckpt = self.root / version
        self.model.save_pretrained(ckpt, safe_serialization=True)
        self.pub.publish(version)
        return str(ckpt)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(sglang_python())
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


def test_plugin_discovered_and_get_model_loader_returns_ferrys_loader(worker):
    out = worker("plugin")
    assert ["ferry", "ferry_agent.engines.sglang:register"] in out["entry_points"]
    assert out["ferry_loader"] and out["ferry_loader_is_sglang_loader"]
    assert out["plain"] == "DummyModelLoader", "a LoadConfig without 'ferry' goes to SGLang"


def test_cold_start_from_agent_equals_sglangs_own_loading(worker, agents, ckpts):
    trainer = Trainer(ckpts, agents)
    ckpt = trainer.publish("v1")
    agents.pull()
    worker("setup", ckpt=ckpt)
    assert worker("sglang_load", ckpt=ckpt, key="ref")["loader"] == "DefaultModelLoader"
    out = worker("cold", ckpt=ckpt, agent_socket=agents.procs["dst"].socket, key="ferry")
    assert out["loader"] == "FerryModelLoader" and out["version"] == "v1"
    assert out["mode"] == "checkpoint"
    cmp = worker("compare", a="ferry", b="ref")
    assert cmp["names"] and cmp["differ"] == [], cmp
    assert cmp["fused"], "SGLang's load_weights fused qkv / gate_up from HF names"


def test_cold_start_from_a_peer_serving_sglang_layout_copies_it_as_is(worker, agents, ckpts):
    """A peer serving SGLang's own (fused, as served) state_dict: copied straight in."""
    ckpt = str(ckpts / "v1")
    worker("publish_own", key="ref", agent_socket=agents.procs["src"].socket, version="sgl-1")
    agents.pull()
    out = worker("cold", ckpt=ckpt, agent_socket=agents.procs["dst"].socket, key="peer")
    assert out["mode"] == "sglang-layout" and out["version"] == "sgl-1"
    cmp = worker("compare", a="peer", b="ref")
    assert cmp["differ"] == [], cmp


def test_refit_session_payloads_pass_sglangs_deserializer_and_load_weights(worker, agents, ckpts):
    trainer = Trainer(ckpts, agents)
    ckpt1 = trainer.publish("v1")
    agents.pull()
    dst = agents.procs["dst"].socket
    worker("cold", ckpt=ckpt1, agent_socket=dst, key="served")
    worker("refit_start", key="served", ckpt=ckpt1, agent_socket=dst)

    trainer.step(1)
    ckpt2 = trainer.publish("v2")
    agents.pull()
    out = worker("wait_applied", version="v2")
    assert out["applied"], out
    assert out["calls"] == [
        "/pause_generation",
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/end_weight_update",
        "/continue_generation",
    ]
    assert out["weight_version"] == "v2", "tagged with the Ferry version"
    worker("sglang_load", ckpt=ckpt2, key="ref2")
    cmp = worker("compare", a="served", b="ref2")
    assert cmp["differ"] == [], cmp


def test_a_slab_sglang_is_reading_is_never_overwritten(worker, agents, ckpts):
    """While SGLang loads version k from the slabs, a pull of k+1 gets no ack and fails
    before writing; SGLang ends with exactly k. (Runs after the refit test: its refitter.)"""
    trainer = Trainer(ckpts, agents)
    trainer.step(2)
    ckpt3 = trainer.publish("v3")
    worker("slow", seconds=4.0)
    agents.pull()
    assert worker("wait_reading")["reading"]
    trainer.step(3)
    trainer.publish("v4")
    with pytest.raises(EngineNotQuiesced):
        agents.pull(quiesce_timeout_s=1.0)
    assert agents.engine("dst").status()["version"] == "v3", "nothing was written"
    out = worker("wait_applied", version="v3")
    assert out["applied"], out
    worker("slow", seconds=0.0)
    worker("sglang_load", ckpt=ckpt3, key="ref3")
    assert worker("compare", a="served", b="ref3")["differ"] == []
