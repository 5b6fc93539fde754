"""Errors of the inference side.

    InferenceError
     ├── ConfigError            settings that cannot be used (bad YAML, bad value)
     ├── UnsafeCacheDir         a compile cache others could write to: its native code is never loaded
     ├── BuildFailed            a compiled package's build process failed; the worker stays eager, retries
     ├── WeightsUnavailable     the asked-for weights cannot be loaded; fatal at start-up
     ├── ClusterUnavailable     no Dask scheduler at the address, or the cluster would not start
     ├── ModelNotResident       a worker has no model plugin (its scheduler restarted); re-register
     │    └── ModelLoadFailed   the plugin is there but its model failed to load; tried again later
     ├── WorkerLost             the batch's workers kept dying (Dask's KilledWorker): split to find the image
     ├── BatchTimeout           a batch ran past batch.timeout_s; cancelled and retried
     ├── StorageUnavailable     the object store failed as a whole (not one object); the batch is retried
     │    └── StoreWideFailure  every object of a batch refused alike (denied, redirected, too slow)
     ├── SourceError            a classify SOURCE that names nothing readable
     └── ImageError             one image failed; becomes that image's error record
          ├── FetchError        the object could not be read (missing, denied, too large)
          └── ImageDecodeError  the bytes are not a readable image, or too many pixels

Per-image errors carry ``stage`` so the records can say where an image failed.

Two signals stay inside a Dask worker and are never raised to a caller (plain ``Exception``,
outside the tree: nothing that catches ``InferenceError`` may stop them on their way):

    DecodeOverdue              a read past the image's decode deadline, inside Pillow's loops
    ObjectTooSlow              an object's body did not arrive within images.fetch_timeout_s
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error raised by the inference package."""


class ConfigError(InferenceError):
    """The settings cannot be used; the message says which key and why."""


class UnsafeCacheDir(InferenceError):
    """A compile cache directory or package another user could have written: its code is never loaded."""


class BuildFailed(InferenceError):
    """A compiled package's build process failed, was killed or ran out of memory; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WeightsUnavailable(InferenceError):
    """Pretrained weights or a checkpoint could not be loaded. The hint names the option of the
    interface in use: ``--weights`` for the commands, ``weights=`` for the Python API."""

    def __init__(self, spec: str, reason: str, option: str = "--weights") -> None:
        def named(value: str) -> str:
            return f'{option}"{value}"' if option.endswith("=") else f"{option} {value}"

        super().__init__(
            f"cannot load weights {spec!r}: {reason}. Alternatives: a checkpoint "
            f"({named('/path/to/state_dict.pt')} or s3://bucket/key.pt), torchvision weights "
            f"pre-downloaded to the torch cache ($TORCH_HOME), or {named('none')} for random "
            "initialisation"
        )
        self.spec, self.reason, self.option = spec, reason, option

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # crosses the Dask boundary intact
        return (type(self), (self.spec, self.reason, self.option))


class ClusterUnavailable(InferenceError):
    """The Dask scheduler could not be reached or the embedded cluster did not start."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"Dask cluster {address} unavailable: {reason}")
        self.address, self.reason = address, reason


class ModelNotResident(InferenceError):
    """A worker was asked to classify with a model plugin it does not hold.

    Happens after a scheduler restart: workers that re-register start without plugins.
    The client registers the plugin again and retries.
    """

    def __init__(self, plugin: str, worker: str) -> None:
        super().__init__(f"model plugin {plugin} is not set up on worker {worker}")
        self.plugin, self.worker = plugin, worker

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses the Dask boundary intact
        return (type(self), (self.plugin, self.worker))


class ModelLoadFailed(ModelNotResident):
    """A worker holds the model plugin, but loading the model failed there (a checkpoint that
    cannot be read, memory that ran out). The worker tries again after a backoff; meanwhile
    the client sends its batches to other workers."""

    def __init__(self, plugin: str, worker: str, reason: str) -> None:
        InferenceError.__init__(self, f"model plugin {plugin} failed to load on worker {worker}: {reason}")
        self.plugin, self.worker, self.reason = plugin, worker, reason

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # type: ignore[override]
        return (type(self), (self.plugin, self.worker, self.reason))


class WorkerLost(InferenceError):
    """Dask gave up on a batch because every worker that ran it died (KilledWorker)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"workers of {address} died running the batch: {reason}")
        self.address, self.reason = address, reason


class BatchTimeout(InferenceError):
    """A batch did not finish within ``batch.timeout_s``; its task was cancelled."""

    def __init__(self, images: int, timeout_s: float) -> None:
        super().__init__(f"batch of {images} image{'' if images == 1 else 's'} did not finish within {timeout_s:g} s (batch.timeout_s)")
        self.images, self.timeout_s = images, timeout_s


class StorageUnavailable(InferenceError):
    """The object store failed as a whole: connection refused, throttled, 5xx, no credentials."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"object store {endpoint} unavailable: {reason}")
        self.endpoint, self.reason = endpoint, reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.endpoint, self.reason))


class StoreWideFailure(StorageUnavailable):
    """Every object of a batch failed its fetch the same way (access denied, a redirect, too
    slow): more likely the store or our access to it than the objects. Retried as the store's
    fault; if it lasts, the objects are tried one by one and get their own dead letters."""


class SourceError(InferenceError):
    """A classify SOURCE names nothing that can be read."""


class ImageError(InferenceError):
    """One image failed at ``stage``; the rest of its batch carries on."""

    stage = "image"

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason


class FetchError(ImageError):
    """An object could not be read: missing, access denied, or above the size limit."""

    stage = "fetch"


class ImageDecodeError(ImageError):
    """An object was fetched but is not a readable image (or exceeds the pixel limit)."""

    stage = "decode"


class DecodeOverdue(Exception):  # noqa: N818 - a signal, not an error a caller sees
    """Raised by a read past the deadline, inside Pillow's parse or decode loop; ``read_header``
    and ``decode`` turn it into that image's ImageDecodeError."""


class ObjectTooSlow(Exception):  # noqa: N818 - a signal, not an error a caller sees
    """An object's body did not arrive within ``images.fetch_timeout_s``; the fetch turns it
    into that image's FetchError."""


class ModelSwapFailed(InferenceError):
    """A new model could not be loaded on every Dask worker: the one in use stays."""

    def __init__(self, plugin: str, reason: str) -> None:
        self.plugin, self.reason = plugin, reason
        super().__init__(f"the new model ({plugin}) did not load on every Dask worker: {reason}")
