"""The process that builds one compiled package: ``python -m inference.worker.package_build``.

A Dask worker never exports or compiles its model in its own process: ``torch.export`` swaps the
parameters of the module it traces for fake tensors while it runs, and fake-tensor mode is not
thread-safe, so a build in a thread of a worker that serves batches breaks both (pytorch#101605).
A build also takes a minute of both cores and gigabytes of memory. Here it has its own interpreter,
its own copy of the weights, a lower CPU priority and a memory bound: a build that fails, crashes
or runs out of memory ends this process only, never the worker or the batch it runs.

The request comes on stdin as one JSON object (``BuildRequest``); the weights come as raw
tensors behind a JSON index (no pickle), written by the worker into its private cache
directory. The package is written beside its final name and renamed into place by the caller's
``inference.worker.compiled.PackageBuilder``. The process ends when its parent does (it polls), and
receives no credential: it reads nothing but the weights file. Its compilers end with it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from inference.worker.model import LoadedModel

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


WEIGHTS_MAGIC = b"visionstream-weights-1\n"


def save_weights(state: dict, path: Path) -> None:
    """A state_dict as raw bytes behind a JSON index (name, dtype, shape, size per tensor),
    written one tensor at a time (never a second copy of every weight in the worker's memory)
    into a file only this user can read; read back by ``load_weights`` without unpickling."""
    tensors = [(name, tensor.detach().cpu().contiguous()) for name, tensor in state.items()]
    index = [{"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": t.numel() * t.element_size()} for name, t in tensors]
    header = json.dumps(index).encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(WEIGHTS_MAGIC + len(header).to_bytes(8, "little") + header)
        for _, tensor in tensors:
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def load_weights(path: str) -> dict:
    state = {}
    with open(path, "rb") as handle:
        if handle.read(len(WEIGHTS_MAGIC)) != WEIGHTS_MAGIC:
            raise ValueError(f"{path}: not a weights file of this version")
        index = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for entry in index:
            raw = torch.frombuffer(bytearray(handle.read(entry["bytes"])), dtype=torch.uint8) if entry["bytes"] else torch.empty(0, dtype=torch.uint8)
            state[entry["name"]] = raw.view(getattr(torch, entry["dtype"])).reshape(entry["shape"])
    return state


def _limit(request: BuildRequest) -> None:
    """Lower priority, a bound on the data segment and the kernel's first pick when memory runs
    out (all inherited by the compiler processes inductor starts): a build that needs too much
    fails here, or is the process killed, never the worker that serves batches."""
    os.umask(0o077)  # the package and inductor's scratch hold the weights
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(request.nice, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:
        pass
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass
    if request.memory_bytes > 0:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        bound = request.memory_bytes if hard == resource.RLIM_INFINITY else min(request.memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (bound, hard))


def _end_with_parent(parent_pid: int) -> None:
    """Exit when the worker that asked for this build is gone: nobody would load the package."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        try:
            os.killpg(0, signal.SIGKILL)  # this process leads its group: its compilers end with it
        finally:
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

    from inference.worker.images import Preprocessing, normalization
    from inference.records.labels import ClassTable
    from inference.records.results import ModelInfo

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
    try:
        _limit(request)
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
