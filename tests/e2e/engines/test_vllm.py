"""vLLM through Ferry, against the real vllm package (its own environment: vLLM pins
its own torch; hack/setup-vllm.sh builds it once, `make test` runs it).

Real agents (host memory) hold a tiny HF Llama checkpoint published by a trainer; a
vLLM process (vllm_worker.py) with Ferry's agent wheel installed finds the plugin
through its entry point, cold-starts a real vLLM LlamaForCausalLM with
`--load-format ferry` and refits it through weight-transfer backend `ferry`; both
must give exactly the parameters vLLM's own loader builds from the same checkpoint.

Not run here: vLLM serving (its CUDA wheel has no CPU ops; this machine has no GPU),
so no forward pass and no CUDA slabs. vllm_worker.py forces vLLM's CPU platform to
build the model; nothing else of vLLM is replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry_agent.engines import ModulePublisher

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("vllm_worker.py")


def vllm_python() -> str:
    py = os.environ.get("FERRY_VLLM_PYTHON")
    if py is not None:  # make test: the last line hack/setup-vllm.sh printed
        if not Path(py).is_file():
            pytest.skip(f"hack/setup-vllm.sh did not build the vLLM environment: {py!r}")
        return py
    out = subprocess.run(
        [str(ROOT / "hack/setup-vllm.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "FERRY_VLLM_CHECK_ONLY": "1"},
    )
    path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    if not path or not Path(path).exists():
        pytest.skip("the vLLM environment is not built: run hack/setup-vllm.sh (make test does)")
    return path


@pytest.fixture(scope="module")
def vllm_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """vLLM's python, and Ferry's agent and API distributions installed from their
    wheels (entry points included) into a folder of their own."""
    py = vllm_python()
    site = tmp_path_factory.mktemp("vllm-site")
    build = tmp_path_factory.mktemp("vllm-build")
    for dist in ("crds", "agent"):  # built from copies: no build/ left in the checkout
        subprocess.run(["cp", "-r", str(ROOT / dist), str(build / dist)], check=True)
        subprocess.run(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(site),
                str(build / dist),
            ],
            check=True,
        )
    return py, site


def checkpoint(path: Path, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_vllm_plugin_cold_start_and_refit_match_vllms_own_loader(agents, vllm_site, tmp_path):
    py, site = vllm_site
    v1, v2 = checkpoint(tmp_path / "v1", seed=1), checkpoint(tmp_path / "v2", seed=2)
    trainer = ModulePublisher(agents.engine("src"), v1)
    trainer.publish("v1")
    assert agents.pull(version="v1").version == "v1"

    args = {
        "socket": agents.procs["dst"].socket,
        "v1": str(tmp_path / "v1"),
        "v2": str(tmp_path / "v2"),
        "kernel": str(tmp_path / "kernel.safetensors"),
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_TARGET_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [py, str(WORKER), json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
        env=env,
    )
    try:
        steps: dict[str, dict] = {}

        def until(name: str) -> dict:
            while name not in steps:
                line = proc.stdout.readline()
                assert line, f"the vLLM worker exited (rc {proc.poll()}) before step {name!r}"
                if line.startswith("{"):
                    msg = json.loads(line)
                    steps[msg["step"]] = msg
            return steps[name]

        plugin = until("plugin")
        assert plugin["entry_points"] == ["ferry_agent.engines.vllm:register"]
        assert plugin["loader"] == "ferry_agent.engines.vllm.FerryModelLoader"
        assert "ferry" in plugin["backends"]

        cold = until("cold")
        assert cold["differ"] == [], f"parameters unlike vLLM's own load: {cold['differ'][:5]}"
        assert cold["fused"], "vLLM's load_weights fused q/k/v and gate/up from HF names"

        ready = until("ready")
        assert ready == {"step": "ready", "engine": "FerryWeightTransferEngine", "is_engine": True}

        # The trainer's next version lands in the target's slabs while vLLM holds v1; the
        # pull pauses the engine (the worker's refit handler acks at once: vLLM does not
        # read the slabs), then vLLM's update round trip applies it.
        trainer.publish("v2", v2)
        assert agents.pull(version="v2").version == "v2"
        proc.stdin.write("apply v2\n")
        proc.stdin.flush()
        refit = until("refit")
        assert refit["applied"] == "v2"
        assert refit["changed"], "the refit changed the parameters"
        assert refit["differ"] == [], (
            f"refit parameters unlike vLLM's own load of v2: {refit['differ'][:5]}"
        )
        assert refit["moved"] == [], "load_weights under layerwise reload keeps parameter addresses"

        # A peer serving vLLM's own parameters (kernel format): a cold start binds them.
        from safetensors.torch import load_file

        until("kernel-saved")
        peer = ModulePublisher(agents.engine("src"), load_file(args["kernel"]))
        peer.publish("k1")
        assert agents.pull(version="k1").version == "k1"
        proc.stdin.write("bind\n")
        proc.stdin.flush()
        bound = until("bound")
        assert bound["bound"] and bound["differ"] == [] and bound["copied"] == [], bound
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
