"""SGLang serving through Ferry on a GPU: cold start from CUDA slabs and a refit through
SGLang's weight-update session (run on the accelerator machine; one GPU is enough).

Needs SGLang's environment on that machine (hack/setup-sglang.sh, which needs PyPI) and
runs `python -m sglang.launch_server` from it, unpatched: Ferry's loader comes in through
its entry point. Two agents on GPU 0 with CUDA slabs; a trainer publishes a tiny HF Qwen2
in bfloat16; the target pulls it; SGLang starts with `--load-format dummy
--model-loader-extra-config '{"ferry": ...}'` and serves it; then a training step is
published, pulled while SGLang serves, and applied by SGLangRefitter over HTTP (pause
retract, begin, update_weights_from_tensor, end, continue). Checked: SGLang's
`get_weights_by_name` equals the trainer's weights after each version, and generations
carry `meta_info.weight_version` = the Ferry version.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SGLANG_PY = os.environ.get("FERRY_SGLANG_PYTHON", str(ROOT / ".venv-sglang/bin/python"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not Path(SGLANG_PY).is_file(),
        reason=f"needs SGLang's environment ({SGLANG_PY}): run hack/setup-sglang.sh",
    ),
]

CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
PROBE = "model.layers.0.mlp.down_proj.weight"  # same name and shape in HF and SGLang


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "sglang.launch_server exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError("SGLang did not become healthy")


def _served_weight(url: str) -> torch.Tensor:
    out = _post(url + "/get_weights_by_name", {"name": PROBE, "truncate_size": 8})
    return torch.tensor(out, dtype=torch.float32)


def test_sglang_serves_from_cuda_slabs_and_refits_through_its_session(tmp_path):
    from ferry_agent.client import EngineClient
    from ferry_agent.engines import ModulePublisher
    from ferry_agent.engines.hf import model_from_config
    from ferry_agent.engines.sglang import HttpSession, SGLangRefitter
    from ferry_agent.peer import AgentClient
    from ferry_agent.request import PullRequest
    from ferry_dev.procs import spawn_agent

    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    common = [
        "--memory",
        "cuda",
        "--device",
        "0",
        "--slab-bytes",
        "256Mi",
        "--log-level",
        "WARNING",
    ]
    src = spawn_agent(tmp_path, "ssrc", token, args=common)
    dst = spawn_agent(tmp_path, "sdst", token, args=common)
    trainer = model_from_config(CONFIG, dtype=torch.bfloat16, seed=1, device="cuda:0")
    ckpt = tmp_path / "model"  # SGLang reads only the config from here (--load-format dummy)
    trainer.config.save_pretrained(ckpt)
    client = EngineClient(src.socket)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}"
    server = None
    try:
        pub = ModulePublisher(client, trainer)
        pub.publish("v1")
        with AgentClient(dst.endpoint, token.read_text()) as rpc:
            rpc.pull(PullRequest([src.endpoint], quiesce=True, timeout_s=120))
            server = subprocess.Popen(
                [
                    SGLANG_PY,
                    "-m",
                    "sglang.launch_server",
                    "--model-path",
                    str(ckpt),
                    "--skip-tokenizer-init",
                    "--load-format",
                    "dummy",
                    "--model-loader-extra-config",
                    json.dumps({"ferry": {"socket": dst.socket}}),
                    "--custom-weight-loader",
                    "ferry_agent.engines.sglang.load_held_version",
                    "--weight-version",
                    "v1",
                    "--mem-fraction-static",
                    "0.2",
                    "--port",
                    str(port),
                ],
                env={**os.environ, "FERRY_AGENT_SOCKET": dst.socket},
                cwd=str(ROOT),
            )
            _wait_healthy(url, server)
            want = trainer.state_dict()[PROBE].float().cpu()
            assert torch.equal(_served_weight(url), want[: len(_served_weight(url))])

            with SGLangRefitter(HttpSession(url), [0], socket=dst.socket) as refitter:
                with torch.no_grad():
                    for p in trainer.parameters():
                        p.add_(torch.randn_like(p) * 0.05)
                pub.publish("v2")
                rpc.pull(PullRequest([src.endpoint], quiesce=True, timeout_s=120))
                deadline = time.monotonic() + 120
                while not refitter.applied and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert refitter.applied and refitter.applied[-1].ok, refitter.applied
            got = _served_weight(url)
            assert torch.equal(got, trainer.state_dict()[PROBE].float().cpu()[: len(got)])
            gen = _post(
                url + "/generate",
                {
                    "input_ids": [1, 2, 3, 4],
                    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                },
            )
            assert gen["meta_info"]["weight_version"] == "v2", gen["meta_info"]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        client.close()
        src.stop()
        dst.stop()
