"""Settings: one frozen object, and the only module that reads the environment.

``load_settings`` layers these sources with pydantic-settings, later wins (the order is stated
once, in ``Settings.settings_customise_sources``):

1. the packaged defaults, ``inference/data/default.yaml`` (``DEFAULT_CONFIG``; mirrored by the
   field defaults below, a test keeps the two equal; ``configs/default.yaml`` links to it);
2. with ``config_env`` (every entry point: the commands, the Python API), the YAML file that
   ``VISIONSTREAM_CONFIG`` names, then a ``--config`` YAML file on top of it;
3. ``VISIONSTREAM_<SECTION>__<KEY>`` environment variables, any case. A value is a string parsed
   by the field's type, never as YAML: ``0123`` stays ``"0123"`` for a string field, a password
   loads verbatim whatever it holds. Lists take a JSON array or comma-separated items. A
   variable with ``__`` that names no setting is an error (pydantic-settings would ignore it);
4. explicit values: ``Settings(...)`` keywords and ``Settings.with_overrides`` (the command line).

``Settings()`` outside ``load_settings`` reads no file and no environment: it is the field
defaults and the values given.

Secrets (``SecretStr``) show as ``**********`` in ``repr``, ``str`` and ``model_dump(mode="json")``,
and never in a ``ConfigError``. A pickled section leaves its credentials behind (arrives with
them ``None``, as ``without_credentials()`` returns it): a secret crosses a process boundary only
through the environment (``Settings.secrets_env()``), so a Dask worker, say, reads its own.

Each function of the service receives the section it needs, never the whole object.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from inference.errors import ConfigError

ENV_PREFIX = "VISIONSTREAM_"
CONFIG_ENV = "VISIONSTREAM_CONFIG"  # a config file read by every entry point (`visionstream stack` prints it)
ENV_NESTED_DELIMITER = "__"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "data" / "default.yaml"


def _items(value: Any) -> Any:
    """A list given as one string (the environment): a JSON array, or comma-separated items;
    an empty string is the empty list."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON array ({exc.msg} at character {exc.pos})") from exc
    return [item.strip() for item in value.split(",") if item.strip()]


def _auto_or_bool(value: Any) -> Any:
    """``"auto"``, or a string pydantic reads as a bool ("true", "0", "no", ...) as that bool:
    a ``Literal[True, False]`` alone refuses the environment's "true"."""
    if isinstance(value, str) and value != "auto":
        try:
            return TypeAdapter(bool).validate_python(value)
        except ValidationError:
            return value  # the Literal reports it, with the choices
    return value


StrList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_items)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    _credentials: ClassVar[tuple[str, ...]] = ()
    """Fields left behind by ``without_credentials()`` and by pickling."""

    def without_credentials(self) -> Self:
        """A copy with the credential fields ``None``: what may cross a process boundary."""
        return self.model_copy(update=dict.fromkeys(self._credentials))

    def __getstate__(self) -> dict[Any, Any]:
        """Pickled, a section leaves its credentials behind (copies and ``model_copy`` keep them)."""
        state = super().__getstate__()
        if self._credentials:
            state = {**state, "__dict__": {**state["__dict__"], **dict.fromkeys(self._credentials)}}
        return state


class CanarySettings(Section):
    """A canary the stream workers start by themselves (``visionstream model canary`` does the same
    from the command line): ``share`` of the images to these weights, judged on labelled images."""

    weights: str = Field(min_length=1)
    name: str | None = None  # None: the serving model's
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    share: float = Field(0.1, gt=0.0, lt=1.0)
    min_labelled: int = Field(200, ge=1)
    max_drop: float = Field(0.02, ge=0.0, le=1.0)


class ModelSettings(Section):
    name: str = "resnet50"
    weights: str = "DEFAULT"
    # the weights file's whole SHA-256 (64 hex digits), checked on the bytes loaded; None: torchvision's
    # weights are checked against the 8-digit prefix in their file name, a checkpoint not at all
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    # CPU: compiled ahead of time once per model, weights, precision and batch size (inference.worker.compiled);
    # auto stays eager, quietly, where no package is cached and no C++ compiler can build one.
    # CUDA: a captured CUDA graph unless true (torch.compile instead)
    compile: Annotated[Literal["auto", True, False], BeforeValidator(_auto_or_bool)] = "auto"
    compile_cache_dir: str | None = None  # where compiled packages are kept; None: <tmp>/visionstream-compiled-<uid>
    compile_memory_mb: int | None = Field(None, ge=0)  # a package build's bound (its data segment); None: sized to the model; 0: none
    top_k: int = Field(5, ge=1, le=1000)
    canary: CanarySettings | None = None  # no part of the model a worker loads (plugin_name leaves it out)


class ImageSettings(Section):
    max_pixels: int = Field(40_000_000, gt=0)
    max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_jpeg_scans: int = Field(100, ge=1)
    decode_timeout_s: float = Field(10.0, gt=0)
    device_batch_max_pixels: int = Field(500_000_000, gt=0)
    draft: bool = True
    decode_threads: int = Field(0, ge=0)
    fetch_concurrency: int = Field(32, ge=1)
    fetch_timeout_s: float = Field(60.0, gt=0)
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    decode_processes: bool = True
    decode_memory_mb: int = Field(2048, ge=0)


class StorageSettings(Section):
    _credentials = ("access_key_id", "secret_access_key")  # a key id without its secret is no use

    bucket: str = "images"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    anon: bool = False
    pin_versions: bool = True  # read the version an event announced (VersionId, else If-Match on its ETag)

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

    def credentials_env(self) -> dict[str, str]:
        """The credentials that are set, as the VISIONSTREAM_STORAGE__* variables a worker
        process reads (``inference.worker.plugin.with_local_credentials``): how the embedded cluster's
        workers get what the client's configuration says, from any source."""
        env: dict[str, str] = {}
        if self.access_key_id:
            env[f"{ENV_PREFIX}STORAGE{ENV_NESTED_DELIMITER}ACCESS_KEY_ID"] = self.access_key_id
        if self.secret_access_key:
            env[f"{ENV_PREFIX}STORAGE{ENV_NESTED_DELIMITER}SECRET_ACCESS_KEY"] = self.secret_access_key.get_secret_value()
        return env

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
    max_in_flight: int = Field(0, ge=0)
    retry_timeout_s: float = Field(300.0, ge=0)
    retry_backoff_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(120.0, gt=0)  # from when a Dask worker starts classifying the batch
    queue_timeout_s: float = Field(600.0, gt=0)  # for a worker to start it (queued behind other batches, a model loading)


class ClusterSettings(Section):
    _credentials = ("tls_key",)

    scheduler: str | None = None
    n_workers: int = Field(0, ge=0)
    threads_per_worker: int = Field(2, ge=1)
    gpu: Annotated[Literal["auto", True, False], BeforeValidator(_auto_or_bool)] = "auto"
    connect_timeout_s: float = Field(30.0, gt=0)
    setup_timeout_s: float = Field(900.0, gt=0)
    tls: bool = True
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: SecretStr | None = None


class KafkaSettings(Section):
    _credentials = ("sasl_username", "sasl_password")

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
    models: str = "visionstream-models"  # `visionstream model set` commands and their outcomes (one partition, compacted)
    review: str = "image-review"  # low-margin predictions for people to label (review.enabled)
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)


class ReviewSettings(Section):
    """Predictions to look at: under ``margin`` between the top two scores they are counted per
    model version (``visionstream_model_low_margin_images_total``) and, with ``enabled``, also
    published to ``topics.review`` for people to label."""

    enabled: bool = False
    margin: float = Field(0.1, ge=0.0, le=1.0)


class EventSettings(Section):
    max_message_bytes: int = Field(1_048_576, ge=1024)
    max_records: int = Field(100, ge=1)
    dead_letter_original_bytes: int = Field(16_384, ge=0)


class FilterSettings(Section):
    buckets: StrList = ()
    prefix: str = ""
    suffixes: StrList = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
    )

    model: ModelSettings = ModelSettings()
    images: ImageSettings = ImageSettings()
    storage: StorageSettings = StorageSettings()
    truth: TruthSettings = TruthSettings()
    batch: BatchSettings = BatchSettings()
    cluster: ClusterSettings = ClusterSettings()
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    events: EventSettings = EventSettings()
    review: ReviewSettings = ReviewSettings()
    filter: FilterSettings = FilterSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: explicit values, the environment, the ``--config`` file, the file
        ``VISIONSTREAM_CONFIG`` names, the packaged defaults. No ``.env`` file (the repository's
        is docker-compose's) and no secrets dir.

        The sources of one ``load_settings`` call arrive through ``_LOADING`` (this hook takes
        no arguments of its own); without them only the explicit values count."""
        loading = _LOADING.get()
        if loading is None:
            return (init_settings,)
        return (init_settings, loading.environment, *loading.config_file, loading.defaults)

    def secrets_env(self) -> dict[str, str]:
        """The secrets that are set, as VISIONSTREAM_* variables: hand these to a child process
        (a dumped config file carries only masked values)."""
        env: dict[str, str] = {}
        for section, key in _SECRETS:
            value = getattr(getattr(self, section), key)
            if value is not None:
                env[_variable(section, key)] = value.get_secret_value()
        return env

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "overrides") -> Settings:
        """A copy with nested overrides, e.g. ``{"batch": {"size": 8}}``; validated; secrets kept.
        ``source`` names them in an error (the command's options, the API's keywords)."""
        try:
            return type(self).model_validate(_merge(self.model_dump(), overrides))  # python mode keeps SecretStr
        except ValidationError as exc:
            # from None: a ValidationError quotes the input values, which may be secrets
            raise _config_error(exc, lambda loc: source, from_files=False) from None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_env: bool = False,
) -> Settings:
    """The packaged defaults, then (with ``config_env``) the file ``VISIONSTREAM_CONFIG`` names,
    then ``config_file`` on top of it, then ``environ`` (``os.environ`` unless given), later wins:
    every entry point (the commands, the Python API) finds settings this way. Any problem is a
    ``ConfigError`` of one line naming the key and the file or variable that set it."""
    environ = os.environ if environ is None else environ
    files = []  # highest first
    if config_file is not None:
        files.append(_YamlFile(Settings, Path(config_file)))
    named = environ.get(CONFIG_ENV) if config_env else None
    if named:
        files.append(_YamlFile(Settings, Path(named), named_by=CONFIG_ENV))
    loading = _Sources(
        defaults=_YamlFile(Settings, DEFAULT_CONFIG),
        config_file=tuple(files),
        environment=_Environment(Settings, environ),
    )
    token = _LOADING.set(loading)
    try:
        return Settings()
    except ValidationError as exc:
        # from None: a ValidationError quotes the input values, which may be secrets
        raise _config_error(exc, loading.origin) from None
    except SettingsError as exc:  # a source failed before validation; its message names the field
        # from None: its cause is the source's own parse error, which may quote a secret value
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _LOADING.reset(token)


def _variable(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{key.upper()}"


def _section_fields(section: str) -> Mapping[str, Any]:
    field = Settings.model_fields.get(section)
    return {} if field is None else field.annotation.model_fields


_SECRETS: tuple[tuple[str, str], ...] = tuple(
    (section, key)
    for section in Settings.model_fields
    for key, field in _section_fields(section).items()
    if SecretStr in (field.annotation, *get_args(field.annotation))
)


def _hide_secrets(data: dict[str, Any]) -> dict[str, Any]:
    """Wrap secret strings as ``SecretStr`` as soon as a source reads them, so that nothing
    printing a source's data (pydantic-settings' debug log, an error) shows them."""
    for section, key in _SECRETS:
        values = data.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            data[section] = {**values, key: SecretStr(values[key])}
    return data


class _Environment(EnvSettingsSource):
    """``VISIONSTREAM_<SECTION>__<KEY>`` variables of ``environ``, parsed by pydantic-settings.

    Only names with the delimiter are settings (``VISIONSTREAM_LOCAL_WORKERS`` and the compose
    file's ``VISIONSTREAM_WEIGHTS`` are not); those must name a field, which pydantic-settings
    does not check."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.variables: dict[tuple[str, ...], str] = {}  # (section, key) -> the name as given
        unknown: list[str] = []
        for name in environ:
            if not name.upper().startswith(ENV_PREFIX):
                continue
            rest = name[len(ENV_PREFIX):].lower()
            path = tuple(rest.split(ENV_NESTED_DELIMITER))
            if rest in Settings.model_fields:
                unknown.append(f"({name}): {rest}: a whole section; set one key, {_variable(rest, '<KEY>')}")
            elif len(path) == 1:
                continue
            elif len(path) != 2 or path[1] not in _section_fields(path[0]):
                unknown.append(f"({name}): {'.'.join(path)}: unknown setting")
            else:
                self.variables[path] = name
        if unknown:
            raise ConfigError(f"invalid configuration {'; '.join(unknown)}")
        self._environ = {name.lower(): environ[name] for name in self.variables.values()}
        super().__init__(settings_cls)  # prefix, delimiter and case from Settings.model_config

    def _load_env_vars(self) -> Mapping[str, str | None]:  # the hook DotEnvSettingsSource overrides too
        return self._environ

    def __call__(self) -> dict[str, Any]:
        return _hide_secrets(super().__call__())

    def label(self, loc: tuple[str, ...]) -> str | None:
        """The variable that set ``loc`` (section, key, ...), if one did."""
        if len(loc) == 1:
            return next((name for path, name in self.variables.items() if path[0] == loc[0]), None)
        return self.variables.get(loc[:2])


class _YamlFile(YamlConfigSettingsSource):
    """One YAML file of settings. Unlike the library's source, a missing or unreadable file is
    an error, and every error is one line that quotes nothing that could be a secret."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path, named_by: str | None = None) -> None:
        self.path, self.named_by = path, named_by  # the variable that named the file, if one did
        super().__init__(settings_cls, yaml_file=path)

    def _read_files(self, files: Any, deep_merge: bool = False) -> dict[str, Any]:
        return self._read_file(self.path)

    def _read_file(self, path: Any) -> dict[str, Any]:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            named = f" (named by {self.named_by}: unset it, or point it at a config file)" if self.named_by else ""
            raise ConfigError(f"cannot read config file {path}{named}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            # from None: a YAML error prints the offending line, which may hold a secret
            raise ConfigError(_yaml_problem(path, exc)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
        # a section whose keys are all commented out reads as null: take it as empty
        return _hide_secrets({section: {} if values is None else values for section, values in data.items()})

    def label(self, loc: tuple[str, ...]) -> str | None:
        """This file's path if it sets ``loc`` (section, key, ...)."""
        node: Any = self.yaml_data
        for part in loc[:2]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return str(self.path)


def _yaml_problem(path: Any, exc: yaml.YAMLError) -> str:
    """``FILE, line N, column M: not valid YAML: PROBLEM``. PyYAML quotes pieces of the document
    in its problems (an alias, a tag: ``found undefined alias 'Sup3rSecret'``), and the document
    may hold a secret, so quoted text is masked; its token names (``'<stream end>'``) are not."""
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    problem = re.sub(r"'(?![<\\])[^']{2,}'", "'...'", problem)
    return f"{path}{where}: not valid YAML: {problem}"


@dataclass(frozen=True)
class _Sources:
    """The sources of one ``load_settings`` call, and which of them set a key."""

    defaults: _YamlFile
    config_file: tuple[_YamlFile, ...]
    environment: _Environment

    def origin(self, loc: tuple[str, ...]) -> str:
        for source in (self.environment, *self.config_file, self.defaults):
            label = source.label(loc)
            if label is not None:
                return label
        return "defaults"


_LOADING: ContextVar[_Sources | None] = ContextVar("visionstream_settings_sources", default=None)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _config_error(exc: ValidationError, origin: Callable[[tuple[str, ...]], str], from_files: bool = True) -> ConfigError:
    """One line, grouped by where the bad values came from:
    ``invalid configuration (SOURCE): section.key: what is wrong; ...``.

    Built from each error's location and message only: pydantic's ``input`` (a secret, maybe)
    is left out, and its messages state what was expected, never what was given."""
    problems: dict[str, list[str]] = {}
    for error in exc.errors(include_input=False, include_url=False):
        loc = tuple(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] == "value_error":  # a validator's own words, without "Value error, "
            message = str(error["ctx"]["error"])
        else:
            message = error["msg"]
        source = origin(loc)
        if loc[:2] in _SECRETS and error["type"] == "string_type" and from_files:
            message += " (in YAML, quote it)"  # a file's 0123 is the number 83
        problems.setdefault(source, []).append(f"{'.'.join(loc) or 'settings'}: {message}")
    return ConfigError(
        "invalid configuration " + "; ".join(f"({source}): {'; '.join(lines)}" for source, lines in problems.items())
    )


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
