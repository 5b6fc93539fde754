"""The torchvision model: weights, device, precision, eval mode; built once per worker."""

from __future__ import annotations

import io
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fsspec
import torch
import torchvision
from torch import Tensor, nn

from inference.errors import ConfigError, WeightsUnavailable
from inference.images import Preprocessing
from inference.labels import ClassTable
from inference.results import ModelInfo
from inference.settings import ModelSettings, StorageSettings

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class WeightsSpec:
    """What ``model.weights`` names: torchvision weights, a checkpoint, or random init."""

    kind: str  # "torchvision" | "checkpoint" | "none"
    value: str

    @classmethod
    def parse(cls, spec: str) -> WeightsSpec:
        text = spec.strip()
        if text.lower() in ("none", "random", ""):
            return cls("none", "none")
        if "://" in text or "/" in text or text.endswith((".pt", ".pth", ".bin", ".ckpt")):
            return cls("checkpoint", text)
        return cls("torchvision", text)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to classify: eval mode, on its device, at its precision."""

    module: nn.Module
    classes: ClassTable
    preprocessing: Preprocessing
    device: torch.device
    precision: str
    info: ModelInfo
    channels_last: bool

    @torch.inference_mode()
    def predict(self, batch: Tensor) -> Tensor:
        """Float32 logits [n, classes] on the CPU for a normalised batch [n, 3, h, w]."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True, memory_format=memory_format)
        with self._autocast():
            logits = self.module(batch)
        return logits.float().cpu()

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])


@torch.inference_mode()
def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-image softmax, then the k best (scores, class indices), each [len(logits), k]."""
    return logits.float().softmax(dim=1).topk(min(k, logits.shape[1]), dim=1)


def load_model(settings: ModelSettings, storage: StorageSettings | None = None) -> LoadedModel:
    """Build the model named in ``settings`` with its weights; raises WeightsUnavailable."""
    weights_enum = _weights_enum(settings.name)
    reference = weights_enum.DEFAULT  # metadata and transforms only: nothing is downloaded
    spec = WeightsSpec.parse(settings.weights)
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    if spec.kind == "torchvision":
        weights = _torchvision_weights(weights_enum, spec.value)
        reference = weights
        module = _download_pretrained(settings.name, weights, spec.value)
    else:
        torch.manual_seed(settings.seed)
        module = torchvision.models.get_model(settings.name, weights=None)
        if spec.kind == "checkpoint":
            _load_checkpoint(module, spec.value, storage or StorageSettings())
    module.eval().requires_grad_(False)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    module = module.to(device, memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if settings.compile:
        module = torch.compile(module)
    categories = reference.meta.get("categories") or []
    classes = ClassTable.imagenet(categories) if len(categories) == 1000 else ClassTable(
        wnids=tuple("" for _ in categories), labels=tuple(categories)
    )
    info = ModelInfo(
        name=settings.name, weights=_describe(spec), precision=precision, device=str(device)
    )
    log.info("model %s weights=%s on %s at %s", info.name, info.weights, info.device, precision)
    return LoadedModel(
        module=module,
        classes=classes,
        preprocessing=Preprocessing.from_transforms(reference.transforms()),
        device=device,
        precision=precision,
        info=info,
        channels_last=settings.channels_last,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but no CUDA device is visible")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto = fp16 on CUDA, bf16 on CPUs with native bf16 (avx512_bf16 / AMX), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _weights_enum(name: str) -> Any:
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"model.name {name!r} is not a torchvision classification model "
            "(see torchvision.models.list_models())"
        )
    return torchvision.models.get_model_weights(name)


def _torchvision_weights(weights_enum: Any, name: str) -> Any:
    try:
        return weights_enum[name.upper()] if name.upper() != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        known = ", ".join(["DEFAULT", *weights_enum.__members__])
        raise ConfigError(f"model.weights {name!r}: not one of {known}, a checkpoint path, or none") from None


def _download_pretrained(model_name: str, weights: Any, spec: str) -> nn.Module:
    """torchvision's own loading: the torch cache, else a download where a network exists."""
    try:
        return torchvision.models.get_model(model_name, weights=weights)
    except Exception as exc:  # noqa: BLE001 - URLError, OSError, hash mismatch...
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsUnavailable(
            f"{spec} ({weights})", f"not in the torch cache ({cache}) and not downloadable: {exc}"
        ) from exc


def _load_checkpoint(module: nn.Module, uri: str, storage: StorageSettings) -> None:
    """A state_dict file, local or s3://; loaded with weights_only (no code runs)."""
    options = storage.storage_options() if uri.startswith(("s3://", "s3a://")) else {}
    try:
        with fsspec.open(uri, "rb", **options) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise WeightsUnavailable(uri, "checkpoint file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailable(uri, f"checkpoint unreadable: {type(exc).__name__}: {exc}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailable(uri, f"not a torch state_dict file: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailable(uri, f"holds a {type(state).__name__}, not a state_dict")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailable(uri, f"does not fit the model: {str(exc).splitlines()[0]}") from None


def _describe(spec: WeightsSpec) -> str:
    if spec.kind == "checkpoint":
        return spec.value  # a path or URI; never carries credentials (they live in settings)
    return spec.value.upper() if spec.kind == "torchvision" else "none"
