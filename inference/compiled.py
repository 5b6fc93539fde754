"""The CPU forward pass compiled ahead of time once (AOTInductor), kept on disk, loaded in a second.

The forward pass (normalisation, autocast, the model) is exported for one chunk shape
(``compiled_batch``: a divisor of the batch size sized to the worker's threads) and compiled by
inductor with freezing: the weights become constants, batch norms fold into the convolutions and
oneDNN's prepacked weight layouts are built once, not per call. A batch runs as chunks of that
shape, the last one padded (rows past the real ones are dropped; in eval mode images do not
interact), so no batch shape ever compiles again and a partial batch pays for one chunk at most.

The result is an AOTInductor package (a ``.pt2``: a shared library and the prepacked weights)
named by everything it depends on: the model, a digest of its weights, precision, chunk,
crop, memory format, torch's version, the CPU capability torch dispatches to, the CPU's model
and flags (inductor builds with -march=native) and the thread count (written into its kernels)
(``package_key``). A worker that finds its package loads it in about a second; one that does
not builds it (a minute or two on a few cores) and writes it by rename, so workers sharing
``model.compile_cache_dir`` never read half a file; one builds while the others wait on a lock
beside the package, then load it. A package is native code loaded into the worker, so only a
directory that no other user can write to is used (``private_dir``).

A worker serves batches eagerly while its package is built, in a thread of its own
(``compile_in_background``) at a lower CPU priority, so the eager batches keep their cores; it
switches between batches once the compiled forward has run a warm-up chunk. A compile that
fails is logged and the worker stays eager.

Why a package and not ``torch.compile``'s own caches: freezing's prepacked weights cannot enter
inductor's graph cache, so a restarted worker would compile again (32 s); without freezing it
caches (13 s) but runs a fifth slower. Measured (``benchmarks/compile_cpu.py``, AMD EPYC, AVX2, 2
cores, ResNet50, fp32, 60 images): eager 7.6-8.4 img/s, ``torch.compile`` 10.0-10.3, with
freezing 12.0-13.0, this package 11.8 in chunks of 10 (chunks of 4 to 60: 11.6-12.2); it builds
in about 50 s and loads, with its warm-up chunk, in 1.5 s. In the worker, beside the decode
threads, small chunks keep less of that speed (BENCHMARKS.md: one call of 60, 95-96 %; chunks
of 4, 76 %) but spare a moderate upload stream the wait behind padding (p50 latency 1.8 s
against 31 s).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn

from inference.model import LoadedModel

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
PACKAGE_FORMAT = 1  # bump when what a package holds or how it is built changes
COMPILE_NICE = 10  # the background compile's CPU priority: it takes what eager batches leave
BUILD_WAIT_S = 1800.0  # the longest a worker waits for another's build of the same package
EXIT_WAIT_S = 300.0  # the longest a process that is exiting waits for its build in progress


def compiles(setting: str | bool, device: torch.device) -> bool:
    """Whether the forward pass is compiled on the CPU: ``model.compile`` true or auto (on CUDA
    the captured graph serves instead). Where no package is cached and no C++ compiler exists,
    auto stays eager (``compile_in_background`` says so); true tries and logs the failure."""
    return device.type == "cpu" and setting in ("auto", True)


def compiled_batch(batch_size: int, torch_threads: int) -> int:
    """The batch shape to compile: the smallest divisor of ``batch_size`` of at least
    max(4, torch_threads). A batch runs as chunks of it, the last one padded, so a partial batch
    (an upload stream at a moderate rate: a few images per linger) pays for at most one chunk, not
    ``batch_size``: on the CPU a forward pass costs in proportion to its images. Padded to 60, at
    half the saturated rate the stream path's p50 latency was 31 s; in chunks of 10, 6.5 s. On 2
    AVX2 cores chunks of 4, 10, 12, 20 and 60 all ran 60 images at 11.6-12.2 img/s
    (benchmarks/compile_cpu.py --chunk); more threads are given larger chunks to share (not
    measured). Pure."""
    least = max(4, torch_threads)
    return next((size for size in range(least, batch_size + 1) if batch_size % size == 0), batch_size)


def default_cache_dir() -> str:
    """Where packages go when ``model.compile_cache_dir`` is unset: per user, under the temp dir."""
    return os.path.join(tempfile.gettempdir(), f"visionstream-compiled-{os.getuid()}")


def package_key(model: LoadedModel, batch_size: int) -> str:
    """A digest of everything a compiled package depends on. Pure but for reading the weights."""
    weights = hashlib.sha256()
    for name, tensor in model.module.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        weights.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        weights.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    mean, std = model.mean_std
    fields = (
        PACKAGE_FORMAT, model.info.name, weights.hexdigest(), model.precision, batch_size,
        model.preprocessing.crop_size, model.channels_last, mean.flatten().tolist(), std.flatten().tolist(),
        torch.__version__, torch.backends.cpu.get_cpu_capability(),
        torch.get_num_threads(),  # inductor writes the OpenMP thread count into its kernels
        _cpu_identity(),  # and builds with -march=native: another CPU model may lack an instruction
    )
    return hashlib.sha256(repr(fields).encode()).hexdigest()


def _cpu_identity() -> str:
    """The CPU's model name and feature flags, as /proc/cpuinfo gives them (empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    wanted = ("model name", "flags", "Features", "CPU part")
    return "|".join(sorted({line.strip() for line in info.splitlines() if line.split(":", 1)[0].strip() in wanted}))


def package_path(model: LoadedModel, batch_size: int, cache_dir: str) -> Path:
    return Path(cache_dir) / f"{model.info.name}-{model.precision}-b{batch_size}-{package_key(model, batch_size)[:24]}.pt2"


class UnsafeCacheDir(Exception):
    """A cache directory or package another user could have written: its code is never loaded."""


def private_dir(path: str) -> Path:
    """``path``, created 0700 if missing, resolved; raises UnsafeCacheDir unless it is a real
    directory (not a symlink) owned by this user and writable by nobody else."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder)
    return folder.resolve()


def _check_private(path: Path) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeCacheDir(f"{path} is a symbolic link")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDir(
            f"{path} is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}: it must be this user's "
            f"(uid {os.getuid()}) and writable by no one else"
        )


class _Forward(nn.Module):
    """What is exported: ``LoadedModel.forward`` (normalise uint8 crops, autocast, the model)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.model = model
        self.module = model.module  # registered, so its weights are the program's parameters

    def forward(self, batch: Tensor) -> Tensor:
        return self.model.forward(batch)


def build_package(model: LoadedModel, batch_size: int, path: Path) -> None:
    """Export, compile with freezing and write the package at ``path`` (by rename)."""
    crop = model.preprocessing.crop_size
    example = torch.zeros(batch_size, 3, crop, crop, dtype=torch.uint8)
    partial = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_native_id()}.pt2")  # the suffix AOTInductor wants
    scratch = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(private_dir(str(path.parent / "inductor")))  # not inductor's default in the shared /tmp
    try:
        with torch.no_grad():
            program = torch.export.export(_Forward(model), (example,))
            with inductor_config.patch(freezing=True):
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        partial.chmod(0o600)  # the weights may be private; and nobody else may rewrite native code
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        if scratch is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = scratch


@dataclass
class CompiledModel:
    """``predict`` through one compiled package for a fixed batch size; padded, chunked."""

    runner: Callable[..., Any]  # the loaded package: uint8 [batch_size, 3, crop, crop] -> logits
    batch_size: int
    eager: LoadedModel  # for what the package was not built for: no rows, floats, another crop
    path: Path

    @classmethod
    def load(cls, model: LoadedModel, batch_size: int, path: Path) -> CompiledModel:
        """Load the package and run one warm-up batch; raises if either fails."""
        _check_private(path)
        compiled = cls(torch._inductor.aoti_load_package(str(path)), batch_size, model, path)
        crop = model.preprocessing.crop_size
        compiled.predict(torch.zeros(batch_size, 3, crop, crop, dtype=torch.uint8))
        return compiled

    @torch.inference_mode()
    def predict(self, batch: Tensor) -> Tensor:
        """Float32 logits on the CPU, as ``LoadedModel.predict``, for any number of images."""
        crop = self.eager.preprocessing.crop_size
        if not len(batch) or batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != (3, crop, crop):
            return self.eager.predict(batch)
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            rows = len(chunk)
            if rows < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - rows, *chunk.shape[1:]))])
            outputs.append(self.runner(chunk.contiguous())[:rows].float())
        return torch.cat(outputs)


def compiled_model(model: LoadedModel, batch_size: int, cache_dir: str | None, compile_setting: str | bool = True) -> CompiledModel | None:
    """The compiled forward: the cached package, else built now (blocking: a minute or more).
    None where auto finds neither a package nor a C++ compiler. Raises if building fails."""
    kept = True
    try:
        folder = private_dir(cache_dir or default_cache_dir())
    except (OSError, UnsafeCacheDir) as exc:
        log.warning("compile cache refused (%s); building into a private directory that is removed once loaded", exc)
        folder, kept = Path(tempfile.mkdtemp(prefix="visionstream-compiled-")), False
    try:
        return _load_or_build(model, batch_size, folder, compile_setting)
    finally:
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)  # loaded: the runner keeps what it needs


def _load_or_build(model: LoadedModel, batch_size: int, folder: Path, compile_setting: str | bool) -> CompiledModel | None:
    path = package_path(model, batch_size, str(folder))
    failed: int | None = None  # the inode of a package that would not load
    if path.exists():
        try:
            return CompiledModel.load(model, batch_size, path)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign package: build it again
            log.warning("compiled package %s unusable (%s: %s); building it again", path, type(exc).__name__, exc)
            failed = path.lstat().st_ino
    if compile_setting == "auto" and not _cpp_compiler():
        log.info("model.compile auto: no package cached in %s and no C++ compiler to build one; the model runs eagerly", folder)
        return None
    with _building(path):  # workers sharing the directory build a package once: the others wait, then load it
        if not path.exists() or path.lstat().st_ino == failed:  # not since rebuilt by another worker
            path.unlink(missing_ok=True)
            for partial in path.parent.glob(f".{path.stem}.*.pt2"):  # left by a build that was killed
                partial.unlink(missing_ok=True)
            build_package(model, batch_size, path)
    return CompiledModel.load(model, batch_size, path)


@contextmanager
def _building(path: Path, timeout_s: float = BUILD_WAIT_S) -> Iterator[None]:
    """An exclusive lock on ``<package>.lock`` (released by the kernel if its holder dies), waited
    for at most ``timeout_s``: a build that hangs elsewhere does not hold this worker forever."""
    deadline = time.monotonic() + timeout_s
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building {path.name} for over {timeout_s:.0f} s") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpp_compiler() -> str | None:
    return next((found for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name and (found := shutil.which(name))), None)


def compile_in_background(
    model: LoadedModel,
    batch_size: int,
    cache_dir: str | None,
    use: Callable[[Callable[[Tensor], Tensor]], None],
    torch_threads: int,
    compile_setting: str | bool = True,
) -> threading.Thread:
    """Load or build the compiled forward in a background thread at a lower CPU priority, then
    ``use(compiled.predict)``. A failure is logged and changes nothing (eager keeps serving)."""

    def run() -> None:
        _lower_priority()
        torch.set_num_threads(torch_threads)
        began = time.monotonic()
        try:
            compiled = compiled_model(model, batch_size, cache_dir, compile_setting)
        except Exception as exc:  # noqa: BLE001 - eager is slower, not wrong
            log.warning("compiling the model failed; it keeps running eagerly: %s: %s", type(exc).__name__, exc)
            return
        if compiled is None:
            return
        use(compiled.predict)
        log.info(
            "model %s now runs compiled (batch %d, %s, package %s), %.1f s after it started loading or compiling",
            model.info.name, batch_size, model.precision, compiled.path, time.monotonic() - began,
        )

    thread = threading.Thread(target=run, name="visionstream-compile", daemon=True)
    thread.start()
    # A process that ends mid-build would abort in C++ teardown (exit 134): let the build end first
    atexit.register(thread.join, EXIT_WAIT_S)
    return thread


def _lower_priority() -> None:
    """This thread (and the threads and compiler processes it starts) at nice ``COMPILE_NICE``."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICE)
    except (AttributeError, OSError):  # not Linux: the compile shares the CPU evenly
        pass
