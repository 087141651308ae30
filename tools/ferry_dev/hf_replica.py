"""An inference replica for a local cluster: a real HF model bound to its agent's slabs.

    python -m ferry_dev.hf_replica --socket AGENT_SOCK --config model.json --out replica.jsonl

The process builds the model from the config (random weights: the bind replaces
them), binds it through a RefitHandler (at start when its agent already holds a
version, else after the first refit), and after every bind or refit generates
greedily from a fixed prompt under the handler's readers lock, the way a serving
loop brackets its forward passes. Each time it appends one JSON line to `--out`:

    {"event": "served", "version", "ok", "condition", "detail", "tokens",
     "logits_sha256", "addresses_sha256", "refits", "paused_at", "resumed_at",
     "served_at"}

`start_replica` runs one and reads its lines (tests, examples/rl, benchmarks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = tuple(b"Ferry: ")
DEFAULT_NEW_TOKENS = 12
# A real Llama small enough for make test: byte-sized vocabulary (no tokenizer to
# download), tied embeddings, grouped-query attention; a wide init so that greedy
# tokens differ from one training step to the next.
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "initializer_range": 0.5,
}


def _addresses_digest(addresses: dict[str, int]) -> str:
    text = ",".join(f"{k}={v}" for k, v in sorted(addresses.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def serve(args: argparse.Namespace) -> int:

    from ferry_agent.client import EngineClient
    from ferry_agent.engines import BoundModule, RefitHandler
    from ferry_agent.engines.hf import greedy, model_from_config
    from ferry_agent.views import torch_dtype

    config = json.loads(Path(args.config).read_text())
    model = model_from_config(config, dtype=torch_dtype(args.dtype), device=args.device)
    prompt = [int(x) for x in args.prompt.split(",")] if args.prompt else list(DEFAULT_PROMPT)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    wake = threading.Event()
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - one line per record, flushed
    client = EngineClient.connect(args.socket, timeout=args.timeout)
    refits = RefitHandler(client, model, resume=lambda version, ok: wake.set())
    refits.start()
    out.write(
        json.dumps({"event": "ready", "version": refits.state.version, "pid": os.getpid()}) + "\n"
    )
    served = -1
    while not stop.is_set():
        state = refits.state
        if state.refits != served and (state.version or state.refits):
            served = state.refits
            record: dict[str, Any] = {
                "event": "served",
                "version": state.version,
                "ok": state.ok,
                "condition": state.condition,
                "detail": state.detail,
                "refits": state.refits,
                "paused_at": state.paused_at,
                "resumed_at": state.resumed_at,
            }
            if state.version:
                with refits.reading():
                    addresses = BoundModule(client, model).addresses()
                    record["addresses_sha256"] = _addresses_digest(addresses)
                    if args.new_tokens:  # 0: only record the refit (benchmarks)
                        g = greedy(model, prompt, args.new_tokens)
                        record |= {
                            "tokens": g.tokens,
                            "logits_sha256": g.logits_sha256,
                            "logits_head": g.logits_head,
                        }
            record["served_at"] = time.time()
            out.write(json.dumps(record) + "\n")
        wake.wait(0.05)
        wake.clear()
    refits.stop()
    client.close()
    out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ferry_dev.hf_replica", description=__doc__.split("\n")[0]
    )
    p.add_argument("--socket", required=True, help="the agent's control socket")
    p.add_argument(
        "--config", required=True, help="JSON file: the transformers config (model_type, ...)"
    )
    p.add_argument("--dtype", default="bfloat16", help="served dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (must be the slabs' device)")
    p.add_argument("--prompt", default="", help="comma-separated token ids (default: b'Ferry: ')")
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="0: no generation")
    p.add_argument("--out", required=True, help="JSON lines are appended here")
    p.add_argument("--timeout", type=float, default=120.0, help="agent request timeout (s)")
    return serve(p.parse_args(argv))


@dataclass
class Replica:
    """A running hf_replica process and the records it wrote."""

    name: str
    proc: subprocess.Popen
    out: Path
    log: Path

    def records(self) -> list[dict[str, Any]]:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def wait(
        self, until: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """The first record for which `until` holds (waiting up to `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records():
                if until(r):
                    return r
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"replica {self.name} exited ({self.proc.returncode}):\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"replica {self.name}: no record {what} in {timeout:g}s:\n"
                    f"{self.records()[-3:]}\n{self.tail()}"
                )
            time.sleep(0.02)

    def ready(self, timeout: float = 180) -> dict[str, Any]:
        return self.wait(lambda r: r["event"] == "ready", timeout, "ready")

    def served(self, version: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait(
            lambda r: r["event"] == "served" and r["version"] == version,
            timeout,
            f"serving {version!r}",
        )

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_replica(
    name: str,
    socket: str,
    config: dict[str, Any],
    workdir: Path,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    new_tokens: int = DEFAULT_NEW_TOKENS,
    prompt: tuple[int, ...] = DEFAULT_PROMPT,
    env: dict[str, str] | None = None,
) -> Replica:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{name}.config.json"
    cfg.write_text(json.dumps(config))
    out, log = workdir / f"{name}.jsonl", workdir / f"{name}.log"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "ferry_dev.hf_replica",
        "--socket",
        socket,
        "--config",
        str(cfg),
        "--dtype",
        dtype,
        "--device",
        device,
        "--new-tokens",
        str(new_tokens),
        "--prompt",
        ",".join(map(str, prompt)),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return Replica(name, proc, out, log)


if __name__ == "__main__":
    sys.exit(main())
