"""Per-image result records: typed, frozen, and plain JSON on the way out; and the schema names
of the events the stream builds from them, with the checks that recognise them. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from inference.records.labels import Truth as GroundTruth  # the truth parsed from a key, as records carry it

# The ``schema`` of the two events the stream writes (``streams.events`` builds them). Named here,
# below ``streams``, so that readers on this side (``inference.records.evaluation``) recognise them too.
PREDICTION_SCHEMA = "visionstream.prediction/v1"
DEAD_LETTER_SCHEMA = "visionstream.dead-letter/v1"


def _kind(schema: str) -> str:
    return schema.rsplit("/", 1)[0]


def is_prediction(record: Mapping[str, Any]) -> bool:
    """A prediction event of any version: a reader goes by the name before ``/vN``."""
    return _kind(str(record.get("schema") or "")) == _kind(PREDICTION_SCHEMA)


def is_dead_letter(record: Mapping[str, Any]) -> bool:
    """A dead-letter event of any version."""
    return _kind(str(record.get("schema") or "")) == _kind(DEAD_LETTER_SCHEMA)


@dataclass(frozen=True, slots=True)
class Prediction:
    class_index: int
    wnid: str
    label: str
    score: float  # this image's own softmax probability


@dataclass(frozen=True, slots=True)
class Failure:
    stage: str  # fetch | decode | inference
    message: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    weights: str  # what the settings named (a torchvision name, a checkpoint's path, none)
    precision: str
    device: str
    # which weights were loaded: the SHA-256 of their bytes ("sha256:<hex>", torchvision's
    # "IMAGENET1K_V2:sha256:<hex>", "random:seed=N"); None from a worker of an earlier release
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds spent on this image's batch, stage by stage."""

    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    queue_ms: float = 0.0  # waiting for the model while another batch ran
    inference_ms: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True, slots=True)
class ImageResult:
    uri: str
    name: str
    prediction: Prediction | None
    top_k: tuple[Prediction, ...]
    ground_truth: GroundTruth | None
    match: bool | None
    error: Failure | None
    model: ModelInfo
    timings: Timings = field(default_factory=Timings)
    worker: str | None = None

    @property
    def margin(self) -> float | None:
        """How far the top score leads the second (None with fewer than two): near 0, the model
        could as well have said the other class."""
        if len(self.top_k) < 2:
            return None
        return self.top_k[0].score - self.top_k[1].score

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["top_k"] = list(data["top_k"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageResult:
        def opt(kind: type, value: dict[str, Any] | None) -> Any:
            return None if value is None else kind(**value)

        return cls(
            uri=data["uri"],
            name=data["name"],
            prediction=opt(Prediction, data.get("prediction")),
            top_k=tuple(Prediction(**p) for p in data.get("top_k") or ()),
            ground_truth=opt(GroundTruth, data.get("ground_truth")),
            match=data.get("match"),
            error=opt(Failure, data.get("error")),
            model=ModelInfo(**data["model"]),
            timings=Timings(**(data.get("timings") or {})),
            worker=data.get("worker"),
        )


# Fetch failure reasons the stream acts on (``inference.worker.fetch`` gives them).
SUPERSEDED = "superseded: the object was overwritten after its event (the newer object's own event gets its prediction)"
SLOW_OBJECT = "reading the object took longer than images.fetch_timeout_s"
# Per-object answers that, when every object of a batch gets the same one, say something about
# the store (a missing KMS permission, a wrong region or endpoint, a store that stalls, a store
# whose events name other ETags than its objects carry, as some MinIO releases did for encrypted
# objects) rather than about the images: then the batch is retried as a store failure, never 60
# dead letters (after batch.retry_timeout_s its objects are tried one by one, each its own record).
STORE_WIDE_REASONS = {"access denied", "bucket in another region or endpoint", SLOW_OBJECT, SUPERSEDED}
