"""Which forward pass a worker's model runs, and switching it between batches.

A model starts eager. On a GPU it is warmed up first: a CUDA graph captured for the batch size
the stream sends (or torch.compile's compilation, with ``model.compile: true``). On the CPU,
where ``model.compile`` allows it, a compiled package (``inference.worker.compiled``) is found
or built in a process of its own while batches run eagerly, and switched in between batches.
Whatever the path, a batch reads ``predict`` once and runs it under ``model_lock``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from inference.worker.compiled import BackgroundCompile, compiled_shapes, compiles
from inference.worker.model import GraphedModel, LoadedModel
from inference.settings import ModelSettings

log = logging.getLogger(__name__)


class ForwardPath:
    """The forward pass batches run now (``predict``), held one batch at a time (``model_lock``)."""

    def __init__(self, model: LoadedModel, settings: ModelSettings, torch_threads: int, warmup_batch: int) -> None:
        self.loaded = model
        self.settings = settings
        self.torch_threads = torch_threads
        self.warmup_batch = warmup_batch  # the batch size a compiled model or a CUDA graph is specialised for
        self.model_lock = threading.Lock()
        self.predict: Callable[[torch.Tensor], torch.Tensor] = model.predict
        self.compiling: BackgroundCompile | None = None  # the compiled forward being found or built, where it is
        self.closed = False

    @property
    def name(self) -> str:
        """How batches run now: compiled, compiling (eager until it is), cuda-graph, torch-compile
        (CUDA with ``model.compile: true``) or eager."""
        owner = getattr(self.predict, "__self__", None)
        if isinstance(owner, GraphedModel):
            return "cuda-graph"
        if self.loaded.device.type == "cuda" and self.settings.compile is True:
            return "torch-compile"
        if owner is not None and owner is not self.loaded:
            return "compiled"
        return "compiling" if self.compiling is not None and self.compiling.is_alive() else "eager"

    def warm_up(self) -> None:
        """On a GPU, pay start-up costs before the first batch: cudnn's kernel choice and a CUDA
        graph for the batch size the stream sends (or torch.compile's compilation)."""
        loaded = self.loaded
        torch.set_num_threads(self.torch_threads)
        crop = loaded.preprocessing.crop_size
        if loaded.device.type == "cuda" and self.settings.compile is not True:
            try:
                self.predict = GraphedModel.capture(loaded, self.warmup_batch).predict
            except Exception:  # noqa: BLE001 - eager is slower, not wrong
                log.warning("CUDA graph capture failed; running the model eagerly", exc_info=True)
        else:
            loaded.predict(torch.zeros(self.warmup_batch, 3, crop, crop, dtype=torch.uint8))

    def compile_in_background(self) -> bool:
        """On the CPU, where ``model.compile`` allows it, start finding or building the compiled
        forward; batches run eagerly until it is loaded. Whether one was started."""
        loaded, settings = self.loaded, self.settings
        if not compiles(settings.compile, loaded.device):
            return False
        shapes = compiled_shapes(self.warmup_batch, self.torch_threads)
        log.info(
            "model %s runs eagerly on cpu at %s while its compiled forward (shapes %s) is loaded or built (model.compile: %s)",
            loaded.info.name, loaded.precision, "+".join(map(str, shapes)), settings.compile,
        )
        self.compiling = BackgroundCompile(
            loaded, shapes, settings.compile_cache_dir, self.use, self.torch_threads, settings.compile,
            memory_mb=settings.compile_memory_mb, between_batches=self.model_lock,
        ).start()
        return True

    def use(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run batches through ``predict`` from the next one on (the compiled forward); not once
        closed. The compile calls it outside the model's lock: a batch reads ``predict`` once."""
        if not self.closed:
            self.predict = predict

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for ``batch``; the caller holds ``model_lock``. Raises whatever the model raises."""
        # OpenMP thread counts are per calling thread, and Dask's nannies export
        # OMP_NUM_THREADS=1: set it in the task thread that runs the model.
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return self.predict(batch)

    def close(self) -> None:
        """Kill a package build in progress; no switch after this."""
        self.closed = True  # no lock: a batch in flight may hold it for seconds
        if self.compiling is not None:
            self.compiling.stop()
