"""`ferry agent run` outside Kubernetes (a plain host, a benchmark, a test) needs none of
the cluster side: agents started with the Kubernetes client, kopf and the artifact
crypto made unimportable still serve, pull and verify."""

from __future__ import annotations

import sys

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BLOCKED = ("kubernetes", "kopf", "cryptography", "urllib3")
# Runs `ferry agent ...` (the real entry point) with the packages above unimportable,
# and leaves a list of the modules it imported in the agent's log when it stops.
LAUNCHER = f"""
import atexit, runpy, sys
BLOCKED = {BLOCKED!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, Refuse())
atexit.register(lambda: print("imported:", " ".join(sorted(sys.modules)), flush=True))
sys.argv = ["ferry", "agent", *sys.argv[1:]]
runpy.run_module("ferry_api.cli", run_name="__main__")
"""


def test_agent_runs_and_pulls_without_the_kubernetes_client(cluster, tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    launcher = [sys.executable, str(script)]
    env = {"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""}
    specs = [TensorSpec(f"w.{i}", "bfloat16", (256, 512)) for i in range(8)]
    src = cluster.spawn("src", launcher=launcher, env=env)
    dst = cluster.spawn("dst", launcher=launcher, env=env)
    se, de = cluster.engine(src), cluster.engine(dst)
    se.declare(specs)
    want = fill(se, seed=3)
    se.publish("v1")
    reply = cluster.rpc(dst).pull(PullRequest([src.endpoint], timeout_s=60))
    assert reply.version == "v1"
    de.attach()
    assert snapshot(de) == want
    for p in (src, dst):
        assert p.stop() == 0, p.log()[-3000:]
        line = next(x for x in p.log().splitlines() if x.startswith("imported:"))
        imported = set(line.split()[1:])
        assert not {m.split(".")[0] for m in imported} & set(BLOCKED), p.log()[-3000:]
