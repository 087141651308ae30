"""One rank of an FSDP2 trainer (gloo, CPU) publishing through ModulePublisher.

    python fsdp_worker.py RANK WORLD PORT SOCKET OUT

Rank 0 publishes into the agent at SOCKET; the others pass client=None and only join
the all-gathers. After each publish rank 0 saves the gathered weights to OUT.<version>.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from engine_models import IDS, Tiny  # noqa: E402

from ferry_agent.client import EngineClient  # noqa: E402
from ferry_agent.engines import ModulePublisher  # noqa: E402


def main() -> None:
    rank, world, port, sock, out = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5],
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    model = Tiny(vocab=90, dim=32)  # 90 rows: FSDP pads the dim-0 shards of 4 ranks unevenly
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    assert type(model.embed.weight).__name__ == "DTensor"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    client = EngineClient(sock) if rank == 0 else None
    pub = ModulePublisher(client, model, dtype=torch.bfloat16)
    for version in ("v1", "v2"):
        if version == "v2":
            model(IDS).logsumexp(-1).mean().backward()
            opt.step()
        pub.publish(version)
        full = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in model.state_dict().items()
        }
        if rank == 0:
            torch.save(
                {
                    k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in full.items()
                },
                f"{out}.{version}",
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
