"""Each local rank's NIXL agents use that GPU's NICs: UCX_NET_DEVICES is set for exactly
the creation of one transport's UCX contexts, so one process holds transports on
different NICs. Proved with the real NIXL in a child process (NIXL and UCX stay out
of pytest's): with TCP as UCX's only transport, a transport given a device that does
not exist cannot start, while the next one, given loopback, starts and reads."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os
os.environ["UCX_TLS"] = "tcp"
os.environ["UCX_NET_DEVICES"] = "inherited0"
from ferry_agent.transport import NixlTransport
try:
    NixlTransport("bad", lanes=1, net_devices="bogus0")
    print("bogus: started")
except Exception as exc:
    print("bogus: refused", type(exc).__name__)
print("env after:", os.environ.get("UCX_NET_DEVICES"))
good = NixlTransport("good", lanes=1, net_devices="lo")
print("lo: started")
good.close()
"""


def test_net_devices_are_scoped_to_one_transport() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    lines = [x for x in done.stdout.splitlines() if x.split(":")[0] in ("bogus", "env after", "lo")]
    assert lines == ["bogus: refused nixlBackendError", "env after: inherited0", "lo: started"], (
        done.stdout + done.stderr[-3000:]
    )
