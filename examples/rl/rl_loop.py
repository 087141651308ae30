"""`make demo-rl`: an RL-style loop whose policy weights travel through Ferry.

A local cluster (etcd, kube-apiserver, the operator, one trainer pod and N
inference pods, each pod's agent a real process). The trainer is a real HF
`LlamaForCausalLM` (random weights from a config, float32 master weights); each
inference replica is its own process serving the same model class in bfloat16,
bound to its agent's slabs (zero copy). Each step:

1. the replicas' greedy outputs from a fixed prompt are the rollouts;
2. the trainer takes an AdamW step (a toy objective: continue the prompt with a
   target phrase, standing in for a reward; the weight flow is the point);
3. it publishes the new weights through its agent (copy + bf16 cast into the slabs);
4. a RefitJob through the operator refits every replica (engine paused, READs,
   resumed); each replica generates again once it serves the new version.

Per step it prints the refit latency, publish done -> every replica serving the
new version, split into data (the slowest target's NIXL READs, as its agent
reports them) and control plane (the rest: the operator learning the version,
assigning, the agents' handshake with their engines). The replicas' outputs
change with the trainer's and equal its own served copy's, token for token.

    python examples/rl/rl_loop.py [--steps 6] [--replicas 2]

The refit mechanism is a `Refitter` (ferry_dev.refit): a continuous refit can
replace the one-shot RefitJob here without changing the loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from kubernetes import client as k8s_client

from ferry_agent.client import EngineClient
from ferry_agent.engines import ModulePublisher
from ferry_agent.engines.hf import greedy, model_from_config, served_copy
from ferry_dev.cluster import DevCluster
from ferry_dev.hf_replica import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT, TINY_LLAMA, start_replica
from ferry_dev.refit import GROUP, VERSION, RefitJobRefitter, weightsource

TARGET = b"weights, ferried."
LR = 3e-2


def text(tokens: list[int]) -> str:
    return "".join(chr(t) if 32 <= t < 127 else "·" for t in tokens)


def train_step(trainer, opt) -> float:
    """One AdamW step toward TARGET after the prompt (the stand-in for a reward)."""
    seq = list(DEFAULT_PROMPT) + list(TARGET)
    ids = torch.tensor([seq])
    labels = torch.tensor([[-100] * len(DEFAULT_PROMPT) + list(TARGET)])
    loss = trainer(ids, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="RL loop: trainer -> Ferry -> inference replicas")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (K)")
    p.add_argument("--replicas", type=int, default=2, help="inference replicas (N)")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ferry-rl-"))
    print(
        f"==> local cluster: 1 trainer pod, {args.replicas} inference pods ({workdir})", flush=True
    )
    cluster = DevCluster(workdir, sources=1, targets=args.replicas)
    replicas = []
    try:
        cluster.up()
        api = cluster.api()
        pods = sorted(p for p, a in cluster.agents.items() if a.role == "target")
        print(
            "==> inference replicas: HF Llama in bf16, each its own process bound to its "
            "agent's slabs",
            flush=True,
        )
        replicas = [
            start_replica(p, cluster.agents[p].socket, TINY_LLAMA, workdir / "replicas")
            for p in pods
        ]
        for r in replicas:
            r.ready()
        trainer = model_from_config(TINY_LLAMA, seed=1).train()
        opt = torch.optim.AdamW(trainer.parameters(), lr=LR)
        client = EngineClient.connect(cluster.agents["trainer-0"].socket)
        pub = ModulePublisher(client, trainer, dtype=torch.bfloat16)
        print(
            f"==> trainer: {type(trainer).__name__} in fp32, publishing {len(pub.layout.entries)} "
            f"tensors as bf16 ({pub.layout.nbytes / 2**20:.2f} MiB; the tied lm_head once)",
            flush=True,
        )
        k8s_client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP,
            VERSION,
            cluster.namespace,
            "weightsources",
            weightsource("policy", {"app": "trainer"}, "tiny-llama"),
        )
        refitter = RefitJobRefitter(
            api,
            cluster.namespace,
            "policy",
            {"app": "inference"},
            [(p, cluster.agents[p].metrics_port) for p in pods],
        )
        prompt = text(list(DEFAULT_PROMPT))
        print(f"==> prompt {prompt!r}; the trainer's target continuation {TARGET.decode()!r}\n")
        print(
            f"{'step':>4} {'loss':>6} {'publish':>8} {'refit':>8} {'control':>8} {'data':>7} "
            f"{'assigned':>9} {'Complete':>9}  replicas' greedy output (= trainer's?)"
        )
        print(
            f"{'':>4} {'':>6} {'ms':>8} {'ms':>8} {'plane ms':>8} {'ms':>7} {'ms':>9} "
            f"{'seen ms':>9}"
        )
        ok = True
        for step in range(args.steps + 1):
            loss = train_step(trainer, opt) if step else float("nan")
            version = f"step-{step}"
            t0 = time.time()
            pub.publish(version)
            published = time.time()
            timing = refitter.refit(version)
            served = [r.served(version) for r in replicas]
            want = greedy(
                served_copy(trainer, TINY_LLAMA, dtype=torch.bfloat16),
                DEFAULT_PROMPT,
                DEFAULT_NEW_TOKENS,
            )
            same = all(
                s["tokens"] == want.tokens and s["logits_sha256"] == want.logits_sha256
                for s in served
            )
            outputs = {text(s["tokens"]) for s in served}
            ok &= same and len(outputs) == 1
            refit_s = max(s["resumed_at"] for s in served) - published
            assigned_s = min(s["paused_at"] for s in served) - published
            data_s = timing.data_s
            print(
                f"{step:>4} {loss:>6.2f} {(published - t0) * 1e3:>8.1f} {refit_s * 1e3:>8.1f} "
                f"{(refit_s - data_s) * 1e3:>8.1f} {data_s * 1e3:>7.2f} {assigned_s * 1e3:>9.1f} "
                f"{(timing.complete_at - published) * 1e3:>9.1f}  "
                f"{' | '.join(sorted(outputs))!r} {'= trainer' if same else '!= TRAINER'}",
                flush=True,
            )
        print(
            "\nrefit: publish done -> every replica resumed on the new version. data: the "
            "slowest replica's NIXL READs (its agent's ferry_agent_transfer_seconds). control "
            "plane: refit - data (the operator learning the version from the source's Lease, "
            "assigning through the targets' Leases, the agents' handshake with their engines). "
            "assigned: publish done -> the first engine paused for its pull. Complete seen: "
            "publish done -> the RefitJob's Complete condition read (folded asynchronously; "
            "the replicas served before)."
        )
        if not ok:
            print("FAILED: a replica's output differed from the trainer's")
            return 1
        print(
            f"==> done in {time.monotonic() - t_start:.0f} s: {args.replicas} replicas equal the "
            f"trainer after each of {args.steps + 1} refits"
        )
        return 0
    finally:
        for r in replicas:
            r.stop()
        cluster.down()
        print("==> stopped everything the demo started")


if __name__ == "__main__":
    sys.exit(main())
