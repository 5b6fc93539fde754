"""The process that builds one compiled package: ``python -m inference.package_build``.

A Dask worker never exports or compiles its model in its own process: ``torch.export`` swaps the
parameters of the module it traces for fake tensors while it runs, and fake-tensor mode is not
thread-safe, so a build in a thread of a worker that serves batches breaks both (pytorch#101605).
A build also takes a minute of both cores and gigabytes of memory. Here it has its own interpreter,
its own copy of the weights, a lower CPU priority and a memory bound: a build that fails, crashes
or runs out of memory ends this process only, never the worker or the batch it runs.

The request comes on stdin as one JSON object (``BuildRequest``); the weights come as a NumPy
archive (no pickle: ``allow_pickle=False``) written by the worker into its private cache
directory. The package is written beside its final name and renamed into place by the caller's
``inference.compiled.PackageBuilder``. The process ends when its parent does (it polls), and
receives no credential: it reads nothing but the weights file.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from inference.model import LoadedModel

PARENT_POLL_S = 1.0


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """What the build needs, as plain values: the architecture, the forward's parameters, the
    weights file, the shape, and where the package goes."""

    model_name: str
    num_classes: int
    precision: str
    channels_last: bool
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_path: str
    batch_size: int
    threads: int
    target: str
    parent_pid: int
    memory_bytes: int
    nice: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BuildRequest:
        fields = json.loads(text)
        fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
        return cls(**fields)


def save_weights(state: dict, path: Path) -> None:
    """A state_dict as a NumPy archive of raw bytes, with each tensor's dtype and shape in its name
    (bf16 has no NumPy dtype); read back by ``load_weights`` without unpickling anything."""
    arrays = {}
    for index, (name, tensor) in enumerate(state.items()):
        data = tensor.detach().cpu().contiguous()
        meta = json.dumps({"name": name, "dtype": str(data.dtype).removeprefix("torch."), "shape": list(data.shape)})
        arrays[f"t{index}"] = np.frombuffer(data.reshape(-1).view(torch.uint8).numpy().tobytes(), dtype=np.uint8)
        arrays[f"m{index}"] = np.frombuffer(meta.encode(), dtype=np.uint8)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_weights(path: str) -> dict:
    state = {}
    with np.load(path, allow_pickle=False) as archive:
        for index in range(len(archive.files) // 2):
            meta = json.loads(archive[f"m{index}"].tobytes())
            raw = torch.from_numpy(archive[f"t{index}"].copy())
            state[meta["name"]] = raw.view(getattr(torch, meta["dtype"])).reshape(meta["shape"])
    return state


def _limit(request: BuildRequest) -> None:
    """Lower priority (inherited by the compiler processes inductor starts) and a bound on the
    process's data segment: an allocation past it fails here, not in the worker."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, request.nice)
    except OSError:
        pass
    if request.memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (request.memory_bytes, request.memory_bytes))


def _end_with_parent(parent_pid: int) -> None:
    """Exit when the worker that asked for this build is gone: nobody would load the package."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Forward(nn.Module):
    """What is exported: ``LoadedModel.forward`` (normalise uint8 crops, autocast, the model)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.model = model
        self.module = model.module  # registered, so its weights are the program's parameters

    def forward(self, batch: Tensor) -> Tensor:
        return self.model.forward(batch)


def export_and_compile(model: LoadedModel, batch_size: int, target: Path) -> None:
    """Export the forward for ``batch_size`` uint8 crops, compile it with freezing, write the
    package at ``target``. Runs in the build process only: export rewrites ``model``'s
    parameters while it traces."""
    import torch._inductor.config as inductor_config

    crop = model.preprocessing.crop_size
    example = torch.zeros(batch_size, 3, crop, crop, dtype=torch.uint8)
    with torch.no_grad():
        program = torch.export.export(_Forward(model), (example,))
        with inductor_config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(program, package_path=str(target))


def build(request: BuildRequest) -> None:
    import torchvision

    from inference.images import Preprocessing, normalization
    from inference.labels import ClassTable
    from inference.results import ModelInfo

    torch.set_num_threads(request.threads)  # inductor writes the thread count into its kernels
    module = torchvision.models.get_model(request.model_name, weights=None, num_classes=request.num_classes)
    module.load_state_dict(load_weights(request.weights_path), strict=True)
    module.eval().requires_grad_(False)
    memory_format = torch.channels_last if request.channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)
    preprocessing = Preprocessing(crop_size=request.crop_size, mean=request.mean, std=request.std)
    model = LoadedModel(
        module=module,
        classes=ClassTable(wnids=(), labels=()),
        preprocessing=preprocessing,
        device=torch.device("cpu"),
        precision=request.precision,
        info=ModelInfo(name=request.model_name, weights="build", precision=request.precision, device="cpu"),
        channels_last=request.channels_last,
        mean_std=normalization(preprocessing),
    )
    export_and_compile(model, request.batch_size, Path(request.target))


def main() -> int:
    request = BuildRequest.from_json(sys.stdin.read())
    _end_with_parent(request.parent_pid)
    _limit(request)
    try:
        build(request)
    except MemoryError:
        print(f"error: out of memory (model.compile_memory_mb: {request.memory_bytes >> 20} MiB)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one line the worker logs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        bound = ""
        if request.memory_bytes and any(sign in first for sign in ("failed to map", "allocate memory", "std::bad_alloc")):
            bound = f" (out of memory? model.compile_memory_mb: {request.memory_bytes >> 20} MiB)"
        print(f"error: {type(exc).__name__}: {first[:400]}{bound}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
