"""The torchvision model: weights, device, precision, eval mode; built once per worker."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import torch
import torchvision
from torch import Tensor, nn

from inference.errors import ConfigError, WeightsUnavailable
from inference.worker.images import Preprocessing, normalization, normalize
from inference.records.labels import ClassTable
from inference.records.results import ModelInfo
from inference.settings import ModelSettings, StorageSettings, WeightsSpec
from inference.worker.cachedir import use_private_inductor_caches
from inference.worker.cpu import cpu_has_native_bf16

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    mean_std: tuple[Tensor, Tensor] = field(default_factory=lambda: normalization(Preprocessing()), compare=False, repr=False)

    @torch.inference_mode()
    def predict(self, batch: Tensor) -> Tensor:
        """Float32 logits [n, classes] on the CPU, for a batch [n, 3, h, w] of uint8 crops
        (scaled and normalised here, on the model's device) or of already normalised floats."""
        return self.forward(self.to_device(batch)).float().cpu()

    def to_device(self, batch: Tensor) -> Tensor:
        """The batch on the model's device; from the CPU to a GPU through pinned memory, without
        blocking the host (keep the uint8 batch: a quarter of float32's bytes)."""
        if batch.device == self.device:
            return batch
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward(self, batch: Tensor) -> Tensor:
        """Logits on the device for a batch already there: normalise uint8, then the model."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = batch.contiguous(memory_format=memory_format)  # on uint8, before it grows 4x
        if batch.dtype == torch.uint8:
            batch = normalize(batch, *self.mean_std)  # keeps the memory format
        with self._autocast():
            return self.module(batch)

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        # no weight-cast cache: it would only hold copies for parameters that need grad, and it
        # is not allowed while a CUDA graph is captured
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision], cache_enabled=False)


@dataclass
class GraphedModel:
    """``predict`` through one captured CUDA graph for a fixed batch shape.

    ResNet50's forward pass is several hundred kernel launches; from Python, each takes the
    GIL, which the decode threads of the same worker also want, so launching, not the GPU,
    sets the pace. Replaying a graph is one launch. Smaller batches are padded up to the
    captured size (rows past the real ones are ignored; in eval mode images do not interact),
    so a partial batch never captures again; larger ones run eagerly.
    """

    model: LoadedModel
    batch_size: int
    graph: Any = field(repr=False)
    static_input: Tensor = field(repr=False)
    static_output: Tensor = field(repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    @torch.inference_mode()
    def capture(cls, model: LoadedModel, batch_size: int) -> GraphedModel:
        """Warm up on a side stream (cudnn picks its kernels), then capture; raises if capture fails."""
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {model.device}")
        crop = model.preprocessing.crop_size
        static_input = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, device=model.device)
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                model.forward(static_input)
        torch.cuda.current_stream(model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's other threads may use CUDA (decode) while this one captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = model.forward(static_input)
        torch.cuda.synchronize(model.device)
        return cls(model, batch_size, graph, static_input, static_output)

    @torch.inference_mode()
    def predict(self, batch: Tensor) -> Tensor:
        """Float32 logits [n, classes] on the CPU, like ``LoadedModel.predict``."""
        count = len(batch)
        if count > self.batch_size or batch.dtype != torch.uint8:
            return self.model.predict(batch)
        batch = self.model.to_device(batch)
        with self.lock:  # one replay at a time: the graph's input and output are shared
            self.static_input[:count].copy_(batch)
            self.graph.replay()
            return self.static_output[:count].float().cpu()


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
        module, digest = _load_pretrained(settings.name, weights, spec.value, settings.weights_sha256)
        version = f"{weights}:sha256:{digest}"
    else:
        torch.manual_seed(settings.seed)
        module = torchvision.models.get_model(settings.name, weights=None)
        version = f"random:seed={settings.seed}"
        if spec.kind == "checkpoint":
            version = "sha256:" + _load_checkpoint(module, spec.value, storage or StorageSettings(), settings.weights_sha256)
    module.eval().requires_grad_(False)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    module = module.to(device, memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if settings.compile is True and device.type == "cuda":  # the CPU compiles in the background (inference.worker.compiled)
        use_private_inductor_caches(settings.compile_cache_dir)
        module = torch.compile(module)
    categories = reference.meta.get("categories") or []
    classes = ClassTable.imagenet(categories) if len(categories) == 1000 else ClassTable(
        wnids=tuple("" for _ in categories), labels=tuple(categories)
    )
    info = ModelInfo(
        name=settings.name, weights=_describe(spec), precision=precision, device=str(device), version=version
    )
    log.info("model %s weights=%s (%s) on %s at %s", info.name, info.weights, info.version, info.device, precision)
    preprocessing = Preprocessing.from_transforms(reference.transforms())
    return LoadedModel(
        module=module,
        classes=classes,
        preprocessing=preprocessing,
        device=device,
        precision=precision,
        info=info,
        channels_last=settings.channels_last,
        mean_std=normalization(preprocessing, device),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {exc}") from exc
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
    except KeyError as exc:
        known = ", ".join(["DEFAULT", *weights_enum.__members__])
        raise ConfigError(f"model.weights {name!r}: not one of {known}, a checkpoint path, or none") from exc


def _load_pretrained(model_name: str, weights: Any, spec: str, sha256: str | None = None) -> tuple[nn.Module, str]:
    """torchvision's weights as a plain state_dict: from the torch cache (``$TORCH_HOME``),
    downloaded there first where a network exists; the file's SHA-256 checked against the
    digest prefix torchvision puts in its name on every load, not only at download (a file
    planted in a shared cache is refused); loaded with ``weights_only`` (no code runs, whatever
    the file holds). torchvision's own loader unpickles the cached file in full. With
    ``model.weights_sha256`` the whole digest is checked instead of the published prefix.
    Returns the module and the SHA-256 of the bytes it was loaded from."""
    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    expected = _digest_prefix(path.name)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=False)
        except Exception as exc:  # noqa: BLE001 - URLError, OSError, hash mismatch...
            raise WeightsUnavailable(
                f"{spec} ({weights})", f"not in the torch cache ({path.parent}) and not downloadable: {type(exc).__name__}: {exc}"
            ) from exc
    data = path.read_bytes()  # hashed and loaded from the same bytes: the file cannot change in between
    digest = hashlib.sha256(data).hexdigest()
    if expected and not digest.startswith(expected):
        raise WeightsUnavailable(f"{spec} ({weights})", f"{path} does not match its published digest ({expected}...): refused")
    _check_sha256(digest, sha256, f"{spec} ({weights})")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        module = torchvision.models.get_model(model_name, weights=None, num_classes=len(weights.meta["categories"]))
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - not a plain state_dict, or not this architecture's
        raise WeightsUnavailable(f"{spec} ({weights})", f"{path} cannot be loaded as a state_dict: {type(exc).__name__}: {exc}") from exc
    return module, digest


def _digest_prefix(filename: str) -> str | None:
    """``resnet50-11ad3fa6.pth`` -> ``11ad3fa6``: the SHA-256 prefix torchvision publishes."""
    match = re.search(r"-([a-f0-9]{6,})\.", filename)
    return match.group(1) if match else None


def _load_checkpoint(module: nn.Module, uri: str, storage: StorageSettings, sha256: str | None = None) -> str:
    """A state_dict file, local or s3://; loaded with weights_only (no code runs); with
    ``model.weights_sha256``, only if the bytes read have that digest. Returns the SHA-256 of
    the bytes loaded."""
    options = storage.storage_options() if uri.startswith(("s3://", "s3a://")) else {}
    shown = redact_uri(uri)  # what errors say: never a token the URI carries
    try:
        with fsspec.open(uri, "rb", **options) as handle:
            data = handle.read()
    except FileNotFoundError as exc:
        raise WeightsUnavailable(shown, "checkpoint file not found") from exc
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailable(shown, f"checkpoint unreadable: {type(exc).__name__}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    _check_sha256(digest, sha256, shown)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailable(shown, f"not a torch state_dict file: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailable(shown, f"holds a {type(state).__name__}, not a state_dict")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailable(shown, f"does not fit the model: {str(exc).splitlines()[0]}") from exc
    return digest


def _check_sha256(digest: str, expected: str | None, shown: str) -> None:
    """The whole SHA-256 of the bytes about to be loaded against ``model.weights_sha256``."""
    if expected is not None and digest != expected.lower():
        raise WeightsUnavailable(shown, f"its SHA-256 is {digest}, not model.weights_sha256 {expected.lower()}: refused")


def _describe(spec: WeightsSpec) -> str:
    """What events, logs and metrics say of the weights: never a secret a URI may carry."""
    if spec.kind == "checkpoint":
        return redact_uri(spec.value)
    return spec.value.upper() if spec.kind == "torchvision" else "none"


def redact_uri(uri: str) -> str:
    """A checkpoint's path or URI without what could be a credential: ``user:token@`` and the
    query (a presigned URL's signature) are dropped. Pure."""
    if "::" in uri:  # an fsspec chain (simplecache::https://user:token@host/m.pt): each link on its own
        return "::".join(redact_uri(link) for link in uri.split("::"))
    parts = urlsplit(uri)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
