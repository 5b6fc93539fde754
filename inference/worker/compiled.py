"""The CPU forward pass compiled ahead of time (AOTInductor), kept on disk, loaded in a second.

The forward pass (normalisation, autocast, the model) is exported for fixed batch shapes and
compiled by inductor with freezing: the weights become constants, batch norms fold into the
convolutions and oneDNN's prepacked weight layouts are built once, not per call. Two shapes are
built (``compiled_shapes``): a small chunk sized to the worker's threads and the full batch. Each
call is planned by the costs measured at load (``CompiledModel.plan``): full batches in one call
where that is cheapest per image, else chunks, the last one padded (rows past the real ones are
dropped; in eval mode images do not interact); a full-batch package slower per image than the
chunks is dropped. No batch shape ever compiles again, and a partial batch of a moderate upload
stream pays for a few chunks, not for 60 rows.

Each shape is an AOTInductor package (a ``.pt2``: a shared library and the prepacked weights)
named by everything it depends on (``package_key``): the model, a digest of its weights,
precision, shape, crop, memory format, a digest of the exported forward's own code, torch's and
torchvision's versions, the CPU capability torch dispatches to, the CPU's model and flags
(inductor builds with -march=native) and the thread count (written into its kernels). A worker
that finds its package loads it in about a second; one that does not has it built and written by
rename, so workers sharing ``model.compile_cache_dir`` never read half a file; one builds while
the others wait on a lock beside the package, then load it. A package is native code loaded into
the worker, so only a directory that no other user can write to is used (``private_dir``).

A package is built apart from serving: in a process of its own (``inference.worker.package_build``:
its own interpreter and copy of the weights, at a lower CPU priority, its data segment bounded by
``model.compile_memory_mb``), never in a thread of the worker, whose model ``torch.export``
would otherwise rewrite under the batches running on it. Meanwhile the worker serves eagerly
(``BackgroundCompile``); it loads each finished package between batches (under the model's lock)
and runs it from the next batch on. A build that fails, crashes or runs out of memory ends its
own process only; it is retried with backoff, its reason logged once.

Why a package and not ``torch.compile``'s own caches: freezing's prepacked weights cannot enter
inductor's graph cache, so a restarted worker would compile again (32 s); without freezing it
caches (13 s) but runs a fifth slower (AMD EPYC, AVX2, 2 cores; BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor

import inference.worker.package_build as package_build
from inference.errors import BuildFailed, UnsafeCacheDir
from inference.worker.images import normalize
from inference.worker.model import LoadedModel
from inference.worker.cachedir import check_private, default_cache_dir, private_dir
from inference.worker.children import child_env
from inference.worker.cpu import cpu_identity
from inference.worker.package_build import BuildRequest, save_weights

log = logging.getLogger(__name__)


class _NoCudaRuntimeNote(logging.Filter):
    """torch's C++ extension module warns, once per process that loads or builds a package, that
    no CUDA runtime is found on a host that has no GPU: true, and nothing a CPU package needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNote())

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_NICE = 10  # the build's CPU priority: it takes what eager batches leave
BUILD_WAIT_S = 1800.0  # the longest a worker waits for another's build of the same package
RETRY_DELAYS_S = (30.0, 120.0, 600.0)  # after a failed build; then the worker stays eager
STDERR_TAIL = 4000  # what is kept of a failed build's output to find its reason in
STOP_WAIT_S = 10.0  # how long stopping waits for a package load in progress


def compiles(setting: str | bool, device: torch.device) -> bool:
    """Whether the forward pass is compiled on the CPU: ``model.compile`` true or auto (on CUDA
    the captured graph serves instead). Where no package is cached and no C++ compiler exists,
    auto stays eager (``BackgroundCompile`` says so); true tries and logs the failure."""
    return device.type == "cpu" and setting in ("auto", True)


def compiled_batch(batch_size: int, torch_threads: int) -> int:
    """The chunk shape: max(4, torch_threads) images, raised to the smallest divisor of
    ``batch_size`` within reach (a full batch then runs as whole chunks), never above
    ``batch_size``. What a full batch leaves (a moderate upload stream sends a few images per
    linger) runs as chunks of it, so it pays for a few chunks, not ``batch_size`` rows: on the
    CPU a forward pass costs in proportion to its images. Padded to 60, at half the saturated
    rate the stream path's p50 latency was 31 s; in chunks of 4, 1.8 s (BENCHMARKS.md). Pure."""
    least = min(max(4, torch_threads), batch_size)
    if least == batch_size:
        return batch_size
    divisor = next(size for size in range(least, batch_size + 1) if batch_size % size == 0)
    return divisor if divisor < batch_size and divisor <= 2 * least else least


def compiled_shapes(batch_size: int, torch_threads: int) -> tuple[int, ...]:
    """The shapes built, in the order they are built: the chunk first (it serves every batch),
    then the full batch (one call per full batch: fewer, larger matrix products). Pure."""
    chunk = compiled_batch(batch_size, torch_threads)
    return (chunk,) if chunk == batch_size else (chunk, batch_size)


def package_key(model: LoadedModel, batch_size: int, threads: int | None = None) -> str:
    """A digest of everything a compiled package depends on. Pure but for reading the weights."""
    weights = hashlib.sha256()
    for name, tensor in model.module.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        weights.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        weights.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    mean, std = model.mean_std
    fields = (
        forward_code_digest(), model.info.name, weights.hexdigest(), model.precision, batch_size,
        model.preprocessing.crop_size, model.channels_last, mean.flatten().tolist(), std.flatten().tolist(),
        torch.__version__, torchvision.__version__, torch.backends.cpu.get_cpu_capability(),
        threads or torch.get_num_threads(),  # inductor writes the OpenMP thread count into its kernels
        cpu_identity(),  # and builds with -march=native: another CPU model may lack an instruction
    )
    return hashlib.sha256(repr(fields).encode()).hexdigest()


@lru_cache(maxsize=1)
def forward_code_digest() -> str:
    """A digest of the code a package is built from: the forward that is exported, what it calls,
    and how it is exported and compiled. A change to any of it names new packages (no format
    number to remember to bump)."""
    parts = (LoadedModel.forward, LoadedModel._autocast, normalize, package_build)  # package_build: the export and compile
    return hashlib.sha256(b"\n".join(_code_of(part) for part in parts)).hexdigest()


def _code_of(part: Any) -> bytes:
    """A function's or module's source; where it ships without (byte code only), its code."""
    try:
        return inspect.getsource(part).encode()
    except (OSError, TypeError):
        code = getattr(part, "__code__", None)
        return code.co_code if code is not None else Path(inspect.getfile(part)).read_bytes()


def package_path(model: LoadedModel, batch_size: int, cache_dir: str, threads: int | None = None) -> Path:
    key = package_key(model, batch_size, threads)[:24]
    return Path(cache_dir) / f"{model.info.name}-{model.precision}-b{batch_size}-{key}.pt2"


@dataclass
class PackageBuilder:
    """Builds packages in a child process (``inference.worker.package_build``), one at a time;
    ``stop`` kills the one running (and the compilers it started) and refuses new ones."""

    memory_mb: int | None = None  # the build's bound (model.compile_memory_mb): None sizes it to the model, 0 is none
    threads: int | None = None  # the worker's torch threads: inductor writes them into its kernels
    nice: int = COMPILE_NICE
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def stopped(self) -> bool:
        return self.stopping.is_set()

    def build(self, model: LoadedModel, batch_size: int, path: Path) -> None:
        """Build the package for ``batch_size`` at ``path`` (by rename); raises BuildFailed."""
        partial = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_native_id()}.pt2")  # the suffix AOTInductor wants
        weights = partial.with_suffix(".weights")
        # inductor's scratch (its shared library holds the weights too): in the private cache, not
        # inductor's default in the shared /tmp, one per build and removed after it
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.inductor-", dir=path.parent))
        threads = self.threads or torch.get_num_threads()
        try:
            save_weights(model.module.state_dict(), weights)
            request = BuildRequest(
                model_name=model.info.name, num_classes=len(model.classes),  # torchvision builds the head for the weights' categories
                precision=model.precision,
                channels_last=model.channels_last, crop_size=model.preprocessing.crop_size,
                mean=tuple(model.preprocessing.mean), std=tuple(model.preprocessing.std),  # type: ignore[arg-type]
                weights_path=str(weights), batch_size=batch_size, threads=threads, target=str(partial),
                parent_pid=os.getpid(), memory_bytes=build_memory_mb(self.memory_mb, model) << 20, nice=self.nice,
            )
            self._run(request, scratch, threads)
            partial.chmod(0o600)  # the weights may be private; and nobody else may rewrite native code
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
            weights.unlink(missing_ok=True)
            shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, request: BuildRequest, scratch: Path, threads: int) -> None:
        with tempfile.TemporaryFile() as output:
            with self.lock:
                if self.stopped:
                    raise BuildFailed("stopped")
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "inference.worker.package_build"],
                    stdin=subprocess.PIPE, stdout=output, stderr=output, env=_build_env(scratch, threads),
                    cwd=scratch, process_group=0,  # its compilers too are killed with it
                )
            process = self.process
            try:
                assert process.stdin is not None
                process.stdin.write(request.to_json().encode())
                process.stdin.close()
            except OSError:
                pass  # it died at once; its output says why
            returncode = process.wait()
            with self.lock:
                self.process = None
            if returncode == 0:
                return
            output.seek(0)
            tail = output.read()[-STDERR_TAIL:].decode(errors="replace")
        raise BuildFailed(_reason(returncode, tail, self.stopped))

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass


def build_memory_mb(setting: int | None, model: LoadedModel) -> int:
    """The build process's bound: ``model.compile_memory_mb``, or where unset four times the
    weights (the module's, the folded constants, the package's copy of them, headroom) plus
    4 GiB for torch and the compiler, at least 8 GiB (ResNet-50's build peaks near 1.2 GB)."""
    if setting is not None:
        return setting
    weights_mb = sum(tensor.numel() * tensor.element_size() for tensor in model.module.state_dict().values()) >> 20
    return max(8192, 4 * weights_mb + 4096)


def _build_env(scratch: Path, threads: int) -> dict[str, str]:
    """The build's environment (``child_env``: no credential of the worker's goes along; the
    build reads only the weights file), with inductor's scratch in the private cache."""
    env = child_env()
    env[CACHE_ENV] = str(scratch)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _reason(returncode: int, output: str, stopped: bool) -> str:
    """One line for a build that did not succeed."""
    if stopped:
        return "stopped"
    if returncode < 0:
        hint = " (out of memory? the kernel kills with SIGKILL)" if returncode == -9 else ""
        return f"the build process was killed by signal {-returncode}{hint}"
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    if lines:
        return lines[-1].removeprefix("error: ")
    last = [line for line in output.splitlines() if line.strip()]
    return f"the build process exited with status {returncode}: {last[-1][:300] if last else 'no output'}"


@dataclass
class CompiledModel:
    """``predict`` through compiled packages for fixed batch shapes; full batches in one call,
    the rest in chunks or padded, whichever measured cheaper."""

    runners: dict[int, Callable[..., Any]]  # shape -> the loaded package: uint8 [shape, 3, crop, crop] -> logits
    costs_s: dict[int, float]  # shape -> seconds a call took at load
    eager: LoadedModel  # for what the packages were not built for: no rows, floats, another crop
    paths: dict[int, Path]

    @staticmethod
    def load_runner(model: LoadedModel, batch_size: int, path: Path) -> tuple[Callable[..., Any], float]:
        """Load one package and run it twice (warm-up, then timed); raises if either fails."""
        check_private(path)
        runner = torch._inductor.aoti_load_package(str(path))
        crop = model.preprocessing.crop_size
        zeros = torch.zeros(batch_size, 3, crop, crop, dtype=torch.uint8)
        timings: list[float] = []
        with torch.inference_mode():
            runner(zeros)  # warm-up
            while len(timings) < 2 or (len(timings) < 3 and sum(timings) < 1.0):  # the least of 2 or 3 calls
                began = time.perf_counter()
                runner(zeros)
                timings.append(time.perf_counter() - began)
        return runner, min(timings)

    def with_shape(self, batch_size: int, runner: Callable[..., Any], cost_s: float, path: Path) -> CompiledModel:
        return CompiledModel({**self.runners, batch_size: runner}, {**self.costs_s, batch_size: cost_s}, self.eager, {**self.paths, batch_size: path})

    @property
    def path(self) -> Path:
        return self.paths[max(self.paths)]

    @torch.inference_mode()
    def predict(self, batch: Tensor) -> Tensor:
        """Float32 logits on the CPU, as ``LoadedModel.predict``, for any number of images."""
        crop = self.eager.preprocessing.crop_size
        if not len(batch) or batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != (3, crop, crop):
            return self.eager.predict(batch)
        outputs = []
        for start, shape in self.plan(len(batch)):
            chunk = batch[start : start + shape]
            rows = len(chunk)
            if rows < shape:
                chunk = torch.cat([chunk, chunk.new_zeros((shape - rows, *chunk.shape[1:]))])
            outputs.append(self.runners[shape](chunk.contiguous())[:rows].float())
        return torch.cat(outputs)

    def uses(self, shape: int) -> bool:
        """Whether any number of rows up to the largest shape is planned with a call of ``shape``."""
        return any(size == shape for rows in range(1, max(self.runners) + 1) for _, size in self.plan(rows))

    def plan(self, rows: int) -> list[tuple[int, int]]:
        """(first row, shape) per call for ``rows`` images: the calls, the last one padded, whose
        measured costs add up to least (a full batch is one call where that is cheapest per
        image; on some CPUs small chunks are). Pure."""
        best: list[tuple[float, int]] = [(0.0, 0)] * (rows + 1)  # rows covered -> (cost, shape of the last call)
        for covered in range(1, rows + 1):
            best[covered] = min((self.costs_s[size] + best[max(0, covered - size)][0], size) for size in self.runners)
        shapes, left = [], rows
        while left > 0:
            shapes.append(best[left][1])
            left -= best[left][1]
        calls, start = [], 0
        for shape in sorted(shapes, reverse=True):
            calls.append((start, shape))
            start += shape
        return calls


def compiled_model(
    model: LoadedModel,
    batch_sizes: int | tuple[int, ...],
    cache_dir: str | None,
    compile_setting: str | bool = True,
    builder: PackageBuilder | None = None,
) -> CompiledModel | None:
    """The compiled forward for every shape: cached packages, else built now (blocking: a minute
    or more each). None where auto finds neither a package nor a C++ compiler. Raises BuildFailed
    if a build fails."""
    compiled = None
    for size in (batch_sizes,) if isinstance(batch_sizes, int) else batch_sizes:
        compiled = add_shape(compiled, model, size, cache_dir, compile_setting, builder or PackageBuilder())
        if compiled is None:
            return None
    return compiled


def add_shape(
    compiled: CompiledModel | None,
    model: LoadedModel,
    batch_size: int,
    cache_dir: str | None,
    compile_setting: str | bool,
    builder: PackageBuilder,
    between_batches: AbstractContextManager[Any] | None = None,
) -> CompiledModel | None:
    """``compiled`` with one more shape, its package loaded (under ``between_batches``: the
    worker's model lock) or built first. None where auto finds neither package nor compiler."""
    kept = True
    try:
        folder = private_dir(cache_dir or default_cache_dir())
    except (OSError, UnsafeCacheDir) as exc:
        log.warning("compile cache refused (%s); building into a private directory that is removed once loaded", exc)
        folder, kept = Path(tempfile.mkdtemp(prefix="visionstream-compiled-")), False
    try:
        path = _package(model, batch_size, folder, compile_setting, builder)
        if path is None:
            return None
        try:
            with between_batches or nullcontext():
                runner, cost_s = CompiledModel.load_runner(model, batch_size, path)
        except Exception:
            with _building(path, builder.stopping):  # not loadable here (another libstdc++, say): the retry builds it
                path.unlink(missing_ok=True)
            raise
        if compiled is None:
            return CompiledModel({batch_size: runner}, {batch_size: cost_s}, model, {batch_size: path})
        return compiled.with_shape(batch_size, runner, cost_s, path)
    finally:
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)  # loaded: the runner keeps what it needs


def _package(model: LoadedModel, batch_size: int, folder: Path, compile_setting: str | bool, builder: PackageBuilder) -> Path | None:
    """The path of a usable package for ``batch_size``: found, or built (once among the workers
    sharing ``folder``). None where auto finds neither a package nor a C++ compiler."""
    path = package_path(model, batch_size, str(folder), builder.threads)
    failed: int | None = None  # the inode of a package that does not check out
    if path.exists():
        try:
            check_private(path)
            _check_package(path)
            return path
        except (OSError, UnsafeCacheDir, ValueError) as exc:
            log.warning("compiled package %s unusable (%s: %s); building it again", path, type(exc).__name__, exc)
            failed = path.lstat().st_ino
    if compile_setting == "auto" and not _cpp_compiler():
        log.info("model.compile auto: no package cached in %s and no C++ compiler to build one; the model runs eagerly", folder)
        return None
    with _building(path, builder.stopping):  # workers sharing the directory build a package once: the others wait, then load it
        if not path.exists() or path.lstat().st_ino == failed:  # not since rebuilt by another worker
            path.unlink(missing_ok=True)
            for partial in path.parent.glob(f".{path.stem}.*"):  # left by a build that was killed
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
            # one build at a time among the workers sharing the directory (a host's, normally):
            # each takes both cores for a minute, and they would only slow each other and the batches
            with _building(folder / ".build-slot", builder.stopping):
                builder.build(model, batch_size, path)
    return path


def _check_package(path: Path) -> None:
    """A package is a zip archive: a truncated or foreign file is rebuilt rather than loaded."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError("not an AOTInductor package (no zip archive)")


@contextmanager
def _building(path: Path, stopping: threading.Event | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (released by the kernel if its holder dies), waited
    for at most ``timeout_s`` (``BUILD_WAIT_S``): a build that hangs elsewhere does not hold this
    worker forever; nor once ``stopping`` is set."""
    wait_s = BUILD_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + wait_s
    stopping = stopping or threading.Event()
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildFailed(f"another process has held {path.name}.lock for over {wait_s:.0f} s") from None  # the busy lock is the whole story
                if stopping.wait(1.0):
                    raise BuildFailed("stopped") from None  # asked to stop: no error behind it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpp_compiler() -> str | None:
    return next((found for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name and (found := shutil.which(name))), None)


class BackgroundCompile:
    """A worker's compiled forward, found or built apart from serving: each shape's package is
    loaded between batches (under ``between_batches``, the model's lock) and handed to ``use``
    as it is ready. A failed build is retried after ``retry_delays_s``, its reason logged once;
    after the last the worker stays eager, and says so."""

    def __init__(
        self,
        model: LoadedModel,
        shapes: tuple[int, ...],
        cache_dir: str | None,
        use: Callable[[Callable[[Tensor], Tensor]], None],
        torch_threads: int,
        compile_setting: str | bool = True,
        memory_mb: int | None = None,
        between_batches: AbstractContextManager[Any] | None = None,
        retry_delays_s: tuple[float, ...] | None = None,
    ) -> None:
        self.model, self.shapes, self.cache_dir, self.use = model, shapes, cache_dir, use
        self.compile_setting, self.between_batches = compile_setting, between_batches
        self.retry_delays_s = RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s
        self.builder = PackageBuilder(memory_mb=memory_mb, threads=torch_threads)
        self.stopping = self.builder.stopping  # one event: stopping the compile stops its builds
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="visionstream-compile", daemon=True)

    def start(self) -> BackgroundCompile:
        self.thread.start()
        atexit.register(self._stop_at_exit)  # a process that exits kills its build rather than wait for it
        return self

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        self.thread.join(timeout_s)

    def stop(self) -> None:
        """Kill a build in progress; nothing more is loaded or used. Returns at once (a plugin's
        teardown may run on the worker's event loop)."""
        self.builder.stop()  # sets ``stopping``, the event both share
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        """``stop``, then a brief wait for a package load in progress: a process that exits
        under one aborts in C++ teardown (exit status 134)."""
        self.stop()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        # OpenMP's thread count is per calling thread (Dask's nannies export OMP_NUM_THREADS=1):
        # the packages' warm-up and timed calls run as the batches will
        torch.set_num_threads(self.builder.threads or torch.get_num_threads())
        began = time.monotonic()
        compiled: CompiledModel | None = None
        for shape in self.shapes:
            added = self._with_retries(compiled, shape)
            if added is None or self.stopping.is_set():
                return
            if compiled is not None and not added.uses(shape):
                log.info(
                    "model %s: one call of %d (%.3f s) costs more than the chunks it would replace here; it keeps "
                    "running compiled in shapes %s", self.model.info.name, shape, added.costs_s[shape],
                    "+".join(map(str, sorted(compiled.runners))),
                )
                return  # the unused package is dropped: its memory and its lock-time back
            compiled = added
            self.use(compiled.predict)
            log.info(
                "model %s now runs compiled (shapes %s, %s, package %s), %.1f s after it started loading or compiling",
                self.model.info.name, "+".join(map(str, sorted(compiled.runners))), self.model.precision,
                compiled.paths[shape], time.monotonic() - began,
            )

    def _with_retries(self, compiled: CompiledModel | None, shape: int) -> CompiledModel | None:
        for attempt, delay_s in enumerate((*self.retry_delays_s, None), start=1):
            try:
                return add_shape(compiled, self.model, shape, self.cache_dir, self.compile_setting, self.builder, self.between_batches)
            except Exception as exc:  # noqa: BLE001 - eager is slower, not wrong
                if self.stopping.is_set():
                    return None
                reason = exc.reason if isinstance(exc, BuildFailed) else f"{type(exc).__name__}: {exc}"
                self._report(reason, attempt, delay_s, shape, compiled)
                if delay_s is None or self.stopping.wait(delay_s):
                    return None
        return None

    def _report(self, reason: str, attempt: int, delay_s: float | None, shape: int, compiled: CompiledModel | None) -> None:
        """One warning per distinct reason; a repeat of the same one is logged at INFO, giving up
        at WARNING."""
        level = logging.INFO if reason in self.failures and delay_s is not None else logging.WARNING
        self.failures.append(reason)
        if delay_s is not None:
            then = f"retrying in {delay_s:.0f} s"
        elif compiled is not None:
            then = f"giving up on shape {shape}: it keeps running compiled in shapes {'+'.join(map(str, sorted(compiled.runners)))}"
        else:
            then = "giving up: it keeps running eagerly"
        log.log(level, "compiling model %s failed (shape %d, attempt %d; %s): %s", self.model.info.name, shape, attempt, then, reason)
