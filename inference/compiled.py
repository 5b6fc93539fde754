"""The CPU forward pass compiled once per worker (``torch.compile``, inductor) for one batch shape.

Every batch is padded up to the compiled size (rows past the real ones are dropped; in eval
mode images do not interact), and a larger one runs in chunks of it, so no batch shape ever
compiles again: a lingering partial batch would otherwise recompile (tens of seconds) or turn
the graph dynamic. The CUDA path does the same with its captured graph (``GraphedModel``).

A worker serves batches eagerly while this compiles, in a thread of its own (``compile_in_background``), and
switches between batches once the compiled forward has run a warm-up batch; a compile that
fails is logged and the worker stays eager. Inductor keeps what it compiled on disk
(``model.compile_cache_dir``, else inductor's own default under the temp dir), keyed by the
graph, shapes, dtypes, torch's version and the CPU's instruction set, and written by rename,
so processes may share the directory; a restarted worker finds it there in seconds. The
weights are inputs of the compiled graph, not constants in it: one cache entry serves every
checkpoint of an architecture.

Measured (benchmarks/compile_cpu.py): on a 2-core AMD EPYC (AVX2, no native bf16), ResNet50 at
batch 60 in fp32, compiled 1.27x eager for a 42 s cold compile (14 s from a warm cache); on a
2-core Xeon with AMX, compiled bf16 126 img/s against 39.9 eager bf16 autocast (issue 21's
figures). So ``model.compile: auto`` compiles on CPUs with native bf16 only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from inference.model import LoadedModel, cpu_has_native_bf16

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compiles(setting: str | bool, device: torch.device) -> bool:
    """Whether the forward pass is compiled on the CPU: ``model.compile`` true, or auto on a CPU
    with native bf16 (where it pays three times over). On CUDA the captured graph serves instead."""
    if device.type != "cpu":
        return False
    if setting == "auto":
        return cpu_has_native_bf16()
    return bool(setting)


@dataclass
class CompiledModel:
    """``predict`` through one compiled forward for a fixed batch size; padded, chunked."""

    model: LoadedModel  # its module compiled
    batch_size: int
    eager: LoadedModel  # the same model uncompiled: for the shape no batch has (none at all)

    @classmethod
    def compile(cls, model: LoadedModel, batch_size: int, cache_dir: str | None = None) -> CompiledModel:
        """Compile and run one warm-up batch (the compilation happens there); raises if it fails."""
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            os.environ[CACHE_ENV] = cache_dir  # inductor reads it when it first needs its cache
        module = torch.compile(model.module, dynamic=False)
        compiled = cls(dataclasses.replace(model, module=module), batch_size, model)
        crop = model.preprocessing.crop_size
        compiled.predict(torch.zeros(batch_size, 3, crop, crop, dtype=torch.uint8))
        return compiled

    @torch.inference_mode()
    def predict(self, batch: Tensor) -> Tensor:
        """Float32 logits on the CPU, as ``LoadedModel.predict``, for any number of images."""
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            rows = len(chunk)
            if rows < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - rows, *chunk.shape[1:]))])
            outputs.append(self.model.predict(chunk)[:rows])
        if not outputs:
            return self.eager.predict(batch)  # an empty batch: never a compile for shape 0
        return torch.cat(outputs)


def compile_in_background(
    model: LoadedModel,
    batch_size: int,
    cache_dir: str | None,
    use: Callable[[Callable[[Tensor], Tensor]], None],
    torch_threads: int,
) -> threading.Thread:
    """Compile in a background thread; ``use(compiled.predict)`` once it has run its warm-up.
    A failure is logged and changes nothing (the eager forward keeps serving)."""

    def run() -> None:
        torch.set_num_threads(torch_threads)
        began = time.monotonic()
        try:
            compiled = CompiledModel.compile(model, batch_size, cache_dir)
        except Exception as exc:  # noqa: BLE001 - eager is slower, not wrong
            log.warning("compiling the model failed; it keeps running eagerly: %s: %s", type(exc).__name__, exc)
            return
        use(compiled.predict)
        log.info(
            "model %s now runs compiled (batch %d, %s), after %.0f s of compiling beside eager batches",
            model.info.name, batch_size, model.precision, time.monotonic() - began,
        )

    thread = threading.Thread(target=run, name="visionstream-compile", daemon=True)
    thread.start()
    return thread
