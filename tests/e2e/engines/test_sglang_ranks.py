"""SGLangRefitter over a two-GPU pod (one agent, two local ranks in host memory): one
SGLang session per version, only once every TP rank's slabs hold it, with one payload
per rank. SGLang's side of the session is recorded here, not run (test_sglang.py runs
it against the real package); this needs no SGLang."""

from __future__ import annotations

import base64
import pickle
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Agents

from ferry_agent.client import EngineClient
from ferry_agent.engines.sglang import SGLangRefitter, ticket_version
from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def shard(rank: int) -> list[TensorSpec]:
    return [TensorSpec(f"layers.{i}.w", "bfloat16", (64 + 32 * rank, 64)) for i in range(3)]


class Recorded:
    """The HTTP calls SGLang would get; payloads decoded as SGLang's unpickler would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append((endpoint, body))
        return {"success": True}

    def updates(self) -> list[dict[str, Any]]:
        with self.lock:
            return [b for e, b in self.calls if e == "/update_weights_from_tensor"]


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    workdir = tmp_path_factory.mktemp("ranks")
    token = workdir / "token"
    token.write_text(secrets.token_hex(16))
    a = Agents(workdir, token)
    try:
        a.start("src", "--ranks", "2")
        a.start("dst", "--ranks", "2")
        yield a
    finally:
        a.close()


def publish(pod: Agents, version: str) -> None:
    for r in (0, 1):
        with EngineClient(pod.procs["src"].socket, rank=r) as c:
            views = c.declare(shard(r))
            c.begin_write()
            for v in views.values():
                v.fill_(float(len(version)))
            c.publish(version)


def pull(pod: Agents, rank: int) -> None:
    with EngineClient(pod.procs["dst"].socket, rank=rank) as d:
        d.declare(shard(rank))  # the layout a fresh target adopts from its source rank
    src = pod.procs["src"].endpoint
    pod.rpc("dst").pull(PullRequest([f"{src}/{rank}"], rank=rank, quiesce=True, timeout_s=30))


def test_one_session_per_version_once_every_tp_rank_holds_it(pod):
    session = Recorded()
    with SGLangRefitter(session, [0, 1], socket=pod.procs["dst"].socket) as refitter:
        publish(pod, "v1")
        pull(pod, 0)
        time.sleep(0.5)
        assert session.calls == [], "applied before rank 1 held v1"
        pull(pod, 1)
        deadline = time.monotonic() + 20
        while not refitter.applied and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a.version for a in refitter.applied] == ["v1"] and refitter.applied[0].ok
        (update,) = session.updates()
        assert update["weight_version"] == "v1"
        payloads = update["serialized_named_tensors"]
        assert len(payloads) == 2, "one payload per TP rank"
        for p in payloads:
            assert ticket_version(pickle.loads(base64.b64decode(p))) == "v1"
    pod.close_clients()
