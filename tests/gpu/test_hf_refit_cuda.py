"""HF cold start + refit with CUDA slabs (run on the accelerator machine; one GPU is enough).

The same flow as tests/e2e/engines/test_hf_refit.py without a control plane (the GPU
machine has no apiserver): the source and target agents on GPU 0, each its own
process with CUDA slabs; a real LlamaForCausalLM trains on GPU 0 in float32 and
publishes bfloat16; the target agent pulls over NIXL (RPC pull, engine paused);
an inference replica on GPU 0 (ferry_dev.hf_replica, its own process) serves its
model bound to the target's CUDA slabs through CUDA IPC. After the cold start, an
AdamW step + refit, and a double-buffer refit, its greedy tokens equal the
trainer's served copy's and the logits are bit-identical; the engine-paused
refit keeps the addresses, the double-buffer swap moves them and says so.
"""

from __future__ import annotations

import secrets

import pytest

from ferry_agent.request import PullRequest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIG = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "initializer_range": 0.5,
}


def test_hf_llama_cuda_cold_start_refit_and_double_buffer_bit_identical(tmp_path):
    from ferry_agent.client import EngineClient
    from ferry_agent.engines import ModulePublisher
    from ferry_agent.engines.hf import greedy, model_from_config, served_copy
    from ferry_agent.peer import AgentClient
    from ferry_dev.hf_replica import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT, start_replica
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
    src = spawn_agent(tmp_path, "hsrc", token, args=common)
    dst = spawn_agent(tmp_path, "hdst", token, args=common)
    replica = start_replica("hgpu", dst.socket, CONFIG, tmp_path / "replica", device="cuda:0")
    client = EngineClient(src.socket)
    try:
        assert replica.ready()["version"] == ""
        trainer = model_from_config(CONFIG, seed=1, device="cuda:0").train()
        opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
        pub = ModulePublisher(client, trainer, dtype=torch.bfloat16)
        assert all(v.device.type == "cuda" for v in pub.views.values())
        seen = {}
        with AgentClient(dst.endpoint, token.read_text()) as rpc:
            for version, mode in (("1", "cold"), ("2", "engine"), ("3", "doubleBuffer")):
                if version != "1":
                    ids = torch.tensor([list(DEFAULT_PROMPT) * 2], device="cuda:0")
                    loss = trainer(ids, labels=ids).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                pub.publish(version)
                rpc.pull(
                    PullRequest(
                        [src.endpoint],
                        quiesce=True,
                        timeout_s=120,
                        double_buffer=mode == "doubleBuffer",
                    )
                )
                want = greedy(
                    served_copy(trainer, CONFIG, dtype=torch.bfloat16),
                    DEFAULT_PROMPT,
                    DEFAULT_NEW_TOKENS,
                )
                got = replica.served(version, timeout=120)
                print(version, mode, got["tokens"], got["logits_sha256"][:16], got["detail"])
                assert got["ok"] and got["condition"] == "Serving", got
                assert got["tokens"] == want.tokens, (version, got, want)
                assert got["logits_sha256"] == want.logits_sha256, (version, got, want)
                seen[mode] = got
        assert seen["cold"]["logits_sha256"] != seen["engine"]["logits_sha256"]
        assert seen["cold"]["addresses_sha256"] == seen["engine"]["addresses_sha256"]
        # The swap re-points the weights and says so. (Their addresses may even be equal:
        # CUDA IPC can map the other set at the virtual range the old mapping released.)
        assert "other slab set" in seen["doubleBuffer"]["detail"]
    finally:
        replica.stop()
        client.close()
        src.stop()
        dst.stop()
        print(replica.tail())
