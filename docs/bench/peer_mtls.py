"""GetVersion round trips over loopback, two in-process agents: plaintext with the
shared token (the baseline) against mTLS with pod certificates (warm channel), and
the first call of a new client (the TLS handshake). Prints JSON.

    .venv/bin/python docs/bench/peer_mtls.py
"""

import json
import statistics
import time

from ferry_agent.agent import Agent, AgentConfig
from ferry_agent.auth import PeerTls
from ferry_agent.peer import AgentClient
from ferry_agent.peerid import PodIdentity, TlsMaterial, new_key_and_csr
from ferry_operator import pki, signer

ca = pki.make_ca("bench")


def mat(pod: str) -> tuple[PodIdentity, TlsMaterial]:
    me = PodIdentity("ns", pod, "u")
    k, r = new_key_and_csr(me)
    return me, TlsMaterial.from_chain(k, signer.sign(ca, r, 3600))


sme, sm = mat("srv")
cme, cm = mat("cli")
tls_srv = PeerTls(sme, lambda: sm, lambda p: None)
tls_cli = PeerTls(cme, lambda: cm, lambda p: None)
a = Agent(
    AgentConfig(pod="srv", namespace="ns", grpc_host="127.0.0.1", slab_bytes=1 << 20), tls=tls_srv
).start()
b = Agent(
    AgentConfig(
        pod="tok", namespace="ns", grpc_host="127.0.0.1", token="t" * 32, slab_bytes=1 << 20
    )
).start()
out = {}
for name, mk in (
    ("token", lambda: AgentClient(b.endpoint, "t" * 32)),
    ("mtls", lambda: AgentClient(a.endpoint, "", tls=tls_cli, expect="srv")),
):
    firsts = []
    for _ in range(20):
        c = mk()
        t = time.perf_counter()
        c.version()
        firsts.append(time.perf_counter() - t)
        c.close()
    c = mk()
    c.version()
    lat = []
    for _ in range(500):
        t = time.perf_counter()
        c.version()
        lat.append(time.perf_counter() - t)
    c.close()
    out[name] = {
        "first_call_ms_median": round(statistics.median(firsts) * 1e3, 3),
        "warm_call_us_median": round(statistics.median(lat) * 1e6, 1),
        "warm_call_us_p99": round(sorted(lat)[int(0.99 * len(lat))] * 1e6, 1),
    }
print(json.dumps(out))
a.close()
b.close()
