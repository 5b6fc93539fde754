"""Settings: one frozen object, and the only module that reads the environment.

Sources, later wins: the packaged defaults, ``inference/data/default.yaml`` (mirrored by the
field defaults below; a test keeps the two equal; ``configs/default.yaml`` links to it), a
``--config`` YAML file, then
``VISIONSTREAM_<SECTION>__<KEY>`` environment variables. Each function of the service
receives the section it needs, never the whole object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from inference.errors import ConfigError

ENV_PREFIX = "VISIONSTREAM_"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "data" / "default.yaml"


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(Section):
    name: str = "resnet50"
    weights: str = "DEFAULT"
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    top_k: int = Field(5, ge=1, le=1000)


class ImageSettings(Section):
    max_pixels: int = Field(40_000_000, gt=0)
    max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    draft: bool = True
    decode_threads: int = Field(0, ge=0)
    fetch_concurrency: int = Field(32, ge=1)
    decode: Literal["auto", "cpu", "gpu"] = "auto"


class StorageSettings(Section):
    bucket: str = "images"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    anon: bool = False

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options; unset keys fall back to the standard AWS environment."""
        options: dict[str, Any] = {"anon": self.anon}
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if self.access_key_id:
            options["key"] = self.access_key_id
        if self.secret_access_key:
            options["secret"] = self.secret_access_key.get_secret_value()
        return options

    def boto3_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            kwargs["region_name"] = self.region
        if self.access_key_id:
            kwargs["aws_access_key_id"] = self.access_key_id
        if self.secret_access_key:
            kwargs["aws_secret_access_key"] = self.secret_access_key.get_secret_value()
        return kwargs


class TruthSettings(Section):
    pattern: str = r"(?:^|/)(?P<wnid>n\d{8})-(?P<label>[^/]+)/[^/]+$"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "wnid" not in compiled.groupindex:
            raise ValueError("the pattern needs a named group (?P<wnid>...)")
        return value


class BatchSettings(Section):
    size: int = Field(60, ge=1, le=10_000)
    linger_s: float = Field(2.0, gt=0)
    max_in_flight: int = Field(2, ge=1)
    retry_timeout_s: float = Field(300.0, ge=0)
    retry_backoff_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(120.0, gt=0)


class ClusterSettings(Section):
    scheduler: str | None = None
    n_workers: int = Field(0, ge=0)
    threads_per_worker: int = Field(2, ge=1)
    gpu: Literal["auto", True, False] = "auto"
    connect_timeout_s: float = Field(30.0, gt=0)


class KafkaSettings(Section):
    bootstrap_servers: str = "localhost:9092"
    consumer_group: str = "visionstream"
    session_timeout_s: float = Field(60.0, gt=0)
    heartbeat_interval_s: float = Field(3.0, gt=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    enable_idempotence: bool = True
    delivery_timeout_s: float = Field(60.0, gt=0)


class TopicSettings(Section):
    uploads: str = "image-uploads"
    backfill: str = "image-uploads-backfill"
    predictions: str = "predictions"
    dead_letter: str = "image-uploads-dlq"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)


class EventSettings(Section):
    max_message_bytes: int = Field(1_048_576, ge=1024)
    max_records: int = Field(100, ge=1)
    dead_letter_original_bytes: int = Field(16_384, ge=0)


class FilterSettings(Section):
    buckets: tuple[str, ...] = ()
    prefix: str = ""
    suffixes: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

    def accepts(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        return not self.suffixes or key.lower().endswith(tuple(s.lower() for s in self.suffixes))


class WorkerSettings(Section):
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=0, le=65535)
    data_dir: str = ".visionstream"
    backfill_share: float = Field(0.5, gt=0, le=1)
    stall_s: float = Field(300.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    log_format: Literal["text", "json"] = "text"


class Settings(Section):
    model: ModelSettings = ModelSettings()
    images: ImageSettings = ImageSettings()
    storage: StorageSettings = StorageSettings()
    truth: TruthSettings = TruthSettings()
    batch: BatchSettings = BatchSettings()
    cluster: ClusterSettings = ClusterSettings()
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    events: EventSettings = EventSettings()
    filter: FilterSettings = FilterSettings()
    worker: WorkerSettings = WorkerSettings()

    def secrets_env(self) -> dict[str, str]:
        """The secrets that are set, as VISIONSTREAM_* variables: hand these to a child process
        (a dumped config file carries only masked values)."""
        env: dict[str, str] = {}
        if self.storage.secret_access_key is not None:
            env[f"{ENV_PREFIX}STORAGE__SECRET_ACCESS_KEY"] = self.storage.secret_access_key.get_secret_value()
        if self.kafka.sasl_password is not None:
            env[f"{ENV_PREFIX}KAFKA__SASL_PASSWORD"] = self.kafka.sasl_password.get_secret_value()
        return env

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """A copy with nested overrides, e.g. ``{"batch": {"size": 8}}``; validated."""
        return _validate(_merge(self.model_dump(mode="json", exclude_none=False) | _secrets(self), overrides), "overrides")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults file, then ``config_file``, then the environment, in that order."""
    data = _read_yaml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else {}
    if config_file is not None:
        data = _merge(data, _read_yaml(Path(config_file)))
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    return _validate(data, str(config_file or DEFAULT_CONFIG))


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``VISIONSTREAM_BATCH__SIZE=32`` -> ``{"batch": {"size": 32}}``; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _secrets(settings: Settings) -> dict[str, Any]:
    """model_dump masks SecretStr; put the real values back for a round trip."""
    out: dict[str, Any] = {}
    if settings.storage.secret_access_key is not None:
        out["storage"] = settings.storage.model_dump(mode="json") | {
            "secret_access_key": settings.storage.secret_access_key.get_secret_value()
        }
    if settings.kafka.sasl_password is not None:
        out["kafka"] = settings.kafka.model_dump(mode="json") | {
            "sasl_password": settings.kafka.sasl_password.get_secret_value()
        }
    return out


def _validate(data: Mapping[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({source}): {problems}") from None
