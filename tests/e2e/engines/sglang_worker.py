"""SGLang's side of tests/e2e/engines/test_sglang.py, run in SGLang's own environment
(hack/setup-sglang.sh). Reads one JSON command per line on stdin, answers one JSON line.

The one thing stubbed, test-only: sgl_kernel's architecture-specific op loading
(`sgl_kernel.load_utils._load_architecture_specific_ops`, which dlopens a CUDA build
needing libcuda.so.1, absent on a machine without a GPU). Nothing of it runs here: the
model is only built and loaded on CPU (SGLANG_USE_CPU_ENGINE=1, gloo), never run.
Everything else is the installed sglang: its plugin loader and hook registry, ServerArgs,
ModelConfig, DefaultModelLoader, Qwen2ForCausalLM, MultiprocessingSerializer, the
io_struct request types and the model runner's WeightUpdater.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import os
import socket
import sys
import threading
import time
import traceback
import types
from typing import Any

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"


def stub_sgl_kernel_ops() -> None:
    """Test-only: sgl_kernel's package import loads its CUDA ops; give it an empty module."""
    spec = importlib.util.find_spec("sgl_kernel")
    assert spec is not None and spec.submodule_search_locations
    path = os.path.join(list(spec.submodule_search_locations)[0], "load_utils.py")
    lspec = importlib.util.spec_from_file_location("sgl_kernel.load_utils", path)
    assert lspec is not None and lspec.loader is not None
    mod = importlib.util.module_from_spec(lspec)
    sys.modules["sgl_kernel.load_utils"] = mod
    lspec.loader.exec_module(mod)
    mod._load_architecture_specific_ops = lambda: types.ModuleType("common_ops")  # type: ignore[attr-defined]
    mod._preload_cuda_library = lambda: None  # type: ignore[attr-defined]


stub_sgl_kernel_ops()

import torch  # noqa: E402

from ferry_agent.client import EngineClient  # noqa: E402
from ferry_agent.engines import sglang as ferry  # noqa: E402

STATE: dict[str, Any] = {}


def setup(ckpt: str) -> dict[str, Any]:
    """ServerArgs for a CPU scheduler of TP rank 0, published as SGLang's scheduler does,
    and the model-parallel groups over gloo."""
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(
        model_path=ckpt,
        device="cpu",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        custom_weight_loader=[ferry.LOADER_PATH],
    )
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    init_distributed_environment(
        world_size=1,
        rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=0,
        backend="gloo",
    )
    initialize_model_parallel()
    STATE["server_args"] = sa
    return {}


def model_config(ckpt: str) -> Any:
    from sglang.srt.configs.model_config import ModelConfig

    sa = STATE["server_args"]
    return ModelConfig.from_server_args(sa, model_path=ckpt)


def device_config() -> Any:
    from sglang.srt.configs.device_config import DeviceConfig

    return DeviceConfig(device="cpu")


def plugin() -> dict[str, Any]:
    """SGLang's own plugin loading, then SGLang's own get_model_loader."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import loader
    from sglang.srt.plugins import load_plugins

    eps = [(e.name, e.value) for e in importlib.metadata.entry_points(group="sglang.srt.plugins")]
    load_plugins()
    ours = loader.get_model_loader(
        LoadConfig(load_format="dummy", model_loader_extra_config={"ferry": {"socket": "/x"}})
    )
    theirs = loader.get_model_loader(LoadConfig(load_format="dummy"))
    return {
        "entry_points": eps,
        "ferry_loader": isinstance(ours, ferry.loader_class()),
        "ferry_loader_is_sglang_loader": isinstance(ours, loader.BaseModelLoader),
        "plain": type(theirs).__name__,
    }


def sglang_load(ckpt: str, key: str) -> dict[str, Any]:
    """SGLang's own loading of the checkpoint (DefaultModelLoader, safetensors)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import loader

    lo = loader.get_model_loader(LoadConfig(load_format="auto"))
    STATE[key] = lo.load_model(model_config=model_config(ckpt), device_config=device_config())
    return {"loader": type(lo).__name__, "tensors": len(STATE[key].state_dict())}


def cold(ckpt: str, agent_socket: str, key: str) -> dict[str, Any]:
    """Ferry's loader, picked by SGLang's get_model_loader from the extra config."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import loader

    lo = loader.get_model_loader(
        LoadConfig(
            load_format="dummy",
            model_loader_extra_config={"ferry": {"socket": agent_socket, "wait_s": 30}},
        )
    )
    STATE[key] = lo.load_model(model_config=model_config(ckpt), device_config=device_config())
    return {"loader": type(lo).__name__, "version": lo.version, "mode": lo.mode}


def compare(a: str, b: str) -> dict[str, Any]:
    sa, sb = STATE[a].state_dict(), STATE[b].state_dict()
    differ = [n for n in sa if n not in sb or not torch.equal(sa[n], sb[n])]
    return {
        "names": sorted(sa) == sorted(sb),
        "differ": differ,
        "tensors": len(sa),
        "fused": [n for n in sa if "qkv_proj" in n or "gate_up_proj" in n][:2],
    }


def publish_own(key: str, agent_socket: str, version: str) -> dict[str, Any]:
    """Publish a loaded SGLang model's own state_dict (SGLang layout: fused, as served)."""
    sd = STATE[key].state_dict()
    with EngineClient(agent_socket) as c:
        views = c.declare(sd)
        c.begin_write()
        for n, t in sd.items():
            views[n].copy_(t)
        c.publish(version)
    return {"tensors": len(sd)}


class LocalSession:
    """SGLang's weight-update session, minus the HTTP server and the scheduler loop
    (they need a GPU here): each body is converted to SGLang's own request type, the
    update's payload goes through the scheduler's deserialization (this TP rank's entry,
    MultiprocessingSerializer) and the model runner's WeightUpdater, as in
    Scheduler.update_weights_from_tensor."""

    def __init__(self, model: Any, mc: Any):
        from sglang.srt.model_executor.model_runner_components.weight_updater import (
            WeightUpdater,
        )

        self.updater = WeightUpdater(
            tp_rank=0,
            device="cpu",
            gpu_id=0,
            model_config=mc,
            custom_weight_loaders=[ferry.LOADER_PATH],
            get_model=lambda: model,
            update_model_fields=lambda **kw: None,
            recapture_cuda_graph=lambda: None,
            get_model_runner=lambda: None,
        )
        self.calls: list[tuple[str, float]] = []
        self.weight_version = ""
        self.delay_s = 0.0
        self.reading = threading.Event()

    def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        from sglang.srt.managers import io_struct
        from sglang.srt.utils import MultiprocessingSerializer

        self.calls.append((endpoint, time.time()))
        kinds = {
            "/pause_generation": io_struct.PauseGenerationReqInput,
            "/begin_weight_update": io_struct.BeginWeightUpdateReqInput,
            "/update_weights_from_tensor": io_struct.UpdateWeightsFromTensorReqInput,
            "/end_weight_update": io_struct.EndWeightUpdateReqInput,
            "/continue_generation": io_struct.ContinueGenerationReqInput,
        }
        if endpoint == "/update_weights_from_tensor":
            # FastAPI decodes the base64 strings (JSON has no bytes) before the scheduler.
            body = {
                **body,
                "serialized_named_tensors": [
                    base64.b64decode(x) for x in body["serialized_named_tensors"]
                ],
            }
        req = kinds[endpoint](**body)  # SGLang's own request type checks the fields
        if endpoint == "/begin_weight_update":
            self.updater.begin_weight_update()
        elif endpoint == "/end_weight_update":
            self.updater.end_weight_update(run_post_load=False)
        elif endpoint == "/update_weights_from_tensor":
            named = MultiprocessingSerializer.deserialize(req.serialized_named_tensors[0])
            self.reading.set()
            time.sleep(self.delay_s)  # a long load_weights: the agent must wait for it
            ok, message = self.updater.update_weights_from_tensor(named, req.load_format)
            self.reading.clear()
            if ok:
                self.weight_version = req.weight_version or ""
            return {"success": ok, "message": message}
        return {"success": True, "message": "Success"}


def refit_start(key: str, ckpt: str, agent_socket: str) -> dict[str, Any]:
    session = LocalSession(STATE[key], model_config(ckpt))
    STATE["session"] = session
    STATE["refitter"] = ferry.SGLangRefitter(session, [0], socket=agent_socket).start()
    return {}


def wait_applied(version: str, timeout: float = 60) -> dict[str, Any]:
    refitter, session = STATE["refitter"], STATE["session"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [a for a in refitter.applied if a.version == version]
        if done:
            a = done[-1]
            return {
                "applied": a.ok,
                "error": a.error,
                "calls": a.calls,
                "weight_version": session.weight_version,
                "times": session.calls,
                "state": refitter.handlers[0].state.condition,
            }
        time.sleep(0.05)
    return {
        "applied": False,
        "error": f"not applied within {timeout} s",
        "versions": [a.version for a in refitter.applied],
    }


def slow(seconds: float) -> dict[str, Any]:
    STATE["session"].delay_s = seconds
    return {}


def wait_reading(timeout: float = 60) -> dict[str, Any]:
    return {"reading": STATE["session"].reading.wait(timeout)}


OPS = {
    f.__name__: f
    for f in (
        setup,
        plugin,
        sglang_load,
        cold,
        compare,
        publish_own,
        refit_start,
        wait_applied,
        slow,
        wait_reading,
    )
}


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = {"ok": True, **OPS[cmd.pop("op")](**cmd)}
        except Exception as exc:
            out = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-3000:],
            }
        print(json.dumps(out), flush=True)
    if "refitter" in STATE:
        STATE["refitter"].stop()


if __name__ == "__main__":
    main()
