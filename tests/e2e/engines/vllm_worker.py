"""The vLLM side of tests/e2e/engines/test_vllm.py, run in the vLLM environment
(hack/setup-vllm.sh) with the real vllm package and Ferry's agent distribution
installed from its wheel (its entry points included).

    python vllm_worker.py '{"socket": ..., "v1": ckpt_dir, "v2": ckpt_dir}'

Prints one JSON line per step; waits for "apply <version>" on stdin before the refit.

Only one thing is not what `vllm serve` does: the platform. vLLM's CUDA wheel has no
CPU ops and no GPU is here, so CPU is forced (`_current_platform = CpuPlatform()`)
before a model is built; no forward pass runs. Model building, `load_weights`, the
plugin, loader and weight-transfer registries are vLLM's own code.
"""

from __future__ import annotations

import json
import socket
import sys
from importlib.metadata import entry_points


def say(**fields):
    print(json.dumps(fields), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args: dict) -> None:
    import torch
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()  # see the module docstring

    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.config.load import LoadConfig
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins

    found = sorted(
        ep.value for ep in entry_points(group="vllm.general_plugins") if ep.name == "ferry"
    )
    load_general_plugins()
    loader = get_model_loader(LoadConfig(load_format="ferry"))
    say(
        step="plugin",
        entry_points=found,
        loader=f"{type(loader).__module__}.{type(loader).__name__}",
        backends=sorted(WeightTransferEngineFactory._registry),
    )

    def config(ckpt: str) -> VllmConfig:
        mc = ModelConfig(model=ckpt, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True)
        return VllmConfig(
            model_config=mc,
            device_config=DeviceConfig(device="cpu"),
            load_config=LoadConfig(load_format="dummy"),
        )

    def snapshot(model) -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def diff(a: dict, b: dict) -> list[str]:
        if set(a) != set(b):
            return [f"names: {sorted(set(a) ^ set(b))[:5]}"]
        return [n for n in sorted(a) if a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]

    base = config(args["v1"])
    with set_current_vllm_config(base):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
        )
        initialize_model_parallel(1, 1)

        def load(ckpt: str, load_config: LoadConfig):
            """A model loaded as vLLM's model runner loads it (load_model: initialize_model,
            the loader's load_weights, process_weights_after_loading), config and all."""
            cfg = config(ckpt)
            cfg.load_config = load_config
            return cfg, get_model_loader(load_config).load_model(cfg, cfg.model_config)

        def own(ckpt: str) -> dict:
            return snapshot(load(ckpt, LoadConfig(load_format="safetensors"))[1])

        want1 = own(args["v1"])
        extra = {"socket": args["socket"], "rank": 0, "timeout_s": 60}
        vc, model = load(
            args["v1"], LoadConfig(load_format="ferry", model_loader_extra_config=extra)
        )
        got1 = snapshot(model)
        say(
            step="cold",
            params=len(got1),
            differ=diff(want1, got1),
            fused=[n for n in got1 if "qkv_proj" in n or "gate_up_proj" in n][:2],
        )

        engine = WeightTransferEngineFactory.create_engine(
            WeightTransferConfig(backend="ferry"), vc, torch.device("cpu"), model
        )
        engine.init_transfer_engine(engine.parse_init_info({"socket": args["socket"], "rank": 0}))
        addresses = {n: p.data_ptr() for n, p in model.named_parameters()}
        say(
            step="ready",
            engine=type(engine).__name__,
            is_engine=isinstance(engine, WeightTransferEngine),
        )

        line = sys.stdin.readline().split()
        version = line[1]
        engine.start_weight_update()
        engine.update_weights({"version": version})
        engine.finish_weight_update()
        got2 = snapshot(model)
        want2 = own(args["v2"])
        moved = [n for n, p in model.named_parameters() if p.data_ptr() != addresses[n]]
        say(
            step="refit",
            applied=engine.applied,
            differ=diff(want2, got2),
            changed=bool(diff(got1, got2)),
            moved=moved[:5],
        )
        engine.shutdown()

        # Replica to replica: this model's own (post-processed) parameters, published by
        # a peer, are bound in place: the parameters are the slab views, no copy.
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in got2.items()}, args["kernel"])
        say(step="kernel-saved", path=args["kernel"])
        sys.stdin.readline()
        _, bound = load(
            args["v1"], LoadConfig(load_format="ferry", model_loader_extra_config=extra)
        )
        client = getattr(bound, "_ferry_client", None)
        views = client.tensors if client is not None else {}
        say(
            step="bound",
            bound=client is not None,
            differ=diff(got2, snapshot(bound)),
            copied=[
                n
                for n, p in bound.named_parameters()
                if n not in views or p.data_ptr() != views[n].data_ptr()
            ][:5],
        )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
