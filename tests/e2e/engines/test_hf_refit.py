"""HF transformers for real: trainer -> source agent -> RefitJob through the operator ->
target pods whose models are bound.

A real `LlamaForCausalLM` built from a config (random weights, nothing downloaded)
trains in float32 in the test process and publishes bfloat16 through the source
pod's agent. Each target pod runs an inference replica (ferry_dev.hf_replica: its
own process, the same model class bound to its agent's slabs). After the cold
start and again after an AdamW step and a refit, every replica's greedy tokens
equal the trainer's served copy's, and the logits are bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from ferry_agent.client import EngineClient
from ferry_agent.engines import ModulePublisher
from ferry_agent.engines.hf import greedy, model_from_config, served_copy
from ferry_dev.cluster import DevCluster
from ferry_dev.hf_replica import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT, TINY_LLAMA, start_replica
from ferry_dev.refit import RefitJobRefitter, weightsource
from tests.kube_helpers import create, get, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LLAMA = TINY_LLAMA


@pytest.mark.cluster(sources=1, targets=2)
def test_hf_llama_cold_start_and_refit_bit_identical(cluster: DevCluster) -> None:
    api = cluster.api()
    targets = sorted(p for p, a in cluster.agents.items() if a.role == "target")
    replicas = [
        start_replica(p, cluster.agents[p].socket, LLAMA, cluster.workdir / "replicas")
        for p in targets
    ]
    try:
        for r in replicas:
            assert r.ready()["version"] == "", "a fresh replica holds no version"
        trainer = model_from_config(LLAMA, seed=1).train()
        opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
        with EngineClient.connect(cluster.agents["trainer-0"].socket) as client:
            pub = ModulePublisher(client, trainer, dtype=torch.bfloat16)
            assert len(pub.layout.entries) == len(trainer.state_dict()) - 1  # lm_head tied
            create(
                api,
                cluster.namespace,
                "weightsources",
                weightsource("policy", {"app": "trainer"}, "tiny-llama"),
            )
            refitter = RefitJobRefitter(
                api,
                cluster.namespace,
                "policy",
                {"app": "inference"},
                [(p, cluster.agents[p].metrics_port) for p in targets],
            )
            seen: list[dict] = []
            for version in ("1", "2"):
                if version == "2":
                    ids = torch.tensor([list(DEFAULT_PROMPT) * 2])
                    loss = trainer(ids, labels=ids).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                pub.publish(version)
                timing = refitter.refit(version)
                assert timing.phase == "Succeeded" and all(s > 0 for s in timing.read_s.values())
                want = greedy(
                    served_copy(trainer, LLAMA, dtype=torch.bfloat16),
                    DEFAULT_PROMPT,
                    DEFAULT_NEW_TOKENS,
                )
                for r in replicas:
                    got = r.served(version)
                    assert got["ok"] and got["condition"] == "Serving", got
                    assert got["tokens"] == want.tokens, (r.name, version, got, want)
                    assert got["logits_sha256"] == want.logits_sha256, (r.name, version, got, want)
                    seen.append(got)
            first, second = seen[: len(replicas)], seen[len(replicas) :]
            assert first[0]["logits_sha256"] != second[0]["logits_sha256"], (
                "the refit changed nothing"
            )
            for a, b in zip(first, second, strict=True):
                assert a["addresses_sha256"] == b["addresses_sha256"], "the refit moved the weights"
            ws = get(api, "weightsources", cluster.namespace, "policy")
            wait_for(
                lambda: (
                    get(api, "weightsources", cluster.namespace, "policy")["status"].get("version")
                    == "2"
                ),
                what="source at 2",
            )
            assert ws["spec"]["model"]["name"] == "tiny-llama"
    finally:
        for r in replicas:
            r.stop()
