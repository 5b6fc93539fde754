import functools
import importlib.resources
import pickle
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import inference
from inference.errors import ConfigError
from inference.settings import DEFAULT_CONFIG, ENV_PREFIX, Settings, StorageSettings, load_settings

REPO = Path(__file__).resolve().parents[2]
PASSWORD = f"{ENV_PREFIX}KAFKA__SASL_PASSWORD"
SECRET_KEY = f"{ENV_PREFIX}STORAGE__SECRET_ACCESS_KEY"

# Secrets as users write them; each distinctive enough that finding it in output is a leak.
SECRETS = [
    "*Sup3rSecretPa55",  # a YAML alias: the ComposerError that printed the password
    "pa ss #x",  # a YAML comment: was cut to "pa ss"
    "0123456",  # a YAML octal: was a number
    "123456",  # a YAML int: was refused as "not a valid string"
    "{a: b}",  # a YAML flow mapping
    "'single' \"double\"",
    "ünïcødé 密码 🔑",
    "  padded  ",
    "${HOME}&&--x=y\\z",
]


def test_default_yaml_matches_the_settings_defaults_key_for_key():
    from_file = yaml.safe_load(DEFAULT_CONFIG.read_text())
    built_in = Settings().model_dump(mode="json")
    assert from_file.keys() == built_in.keys()
    for section, values in built_in.items():
        file_values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in from_file[section].items()}
        assert file_values == values, section


def test_every_default_yaml_key_carries_a_comment():
    lines = DEFAULT_CONFIG.read_text().splitlines()
    uncommented = [
        line for previous, line in zip(["", *lines], lines)
        if line.startswith("  ") and ":" in line and "#" not in line and not previous.strip().startswith("#")
    ]
    assert uncommented == []


def test_the_defaults_ship_inside_the_package_and_the_repository_copy_links_to_them():
    packaged = importlib.resources.files("inference") / "data" / "default.yaml"
    assert packaged.is_file()
    assert DEFAULT_CONFIG.is_relative_to(Path(inference.__file__).resolve().parent)
    assert DEFAULT_CONFIG.read_text() == packaged.read_text()
    assert (REPO / "configs" / "default.yaml").resolve() == DEFAULT_CONFIG


def test_precedence_is_defaults_then_config_file_then_environment_then_overrides(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("batch:\n  size: 32\n  linger_s: 5\n  max_in_flight: 3\nmodel:\n  name: resnet18\n")
    environ = {f"{ENV_PREFIX}BATCH__SIZE": "16", f"{ENV_PREFIX}BATCH__LINGER_S": "4"}

    assert load_settings(environ={}).batch.size == 60  # the defaults file
    from_file = load_settings(config, environ={})
    assert (from_file.batch.size, from_file.batch.linger_s, from_file.model.name) == (32, 5.0, "resnet18")
    from_env = load_settings(config, environ=environ)
    assert (from_env.batch.size, from_env.batch.linger_s) == (16, 4.0)  # the environment beats the file
    assert from_env.batch.max_in_flight == 3 and from_env.model.name == "resnet18"  # the file beats the defaults
    assert from_env.batch.retry_timeout_s == 300.0  # untouched default
    overridden = from_env.with_overrides({"batch": {"size": 8}})
    assert (overridden.batch.size, overridden.batch.linger_s, overridden.batch.max_in_flight) == (8, 4.0, 3)


def test_settings_alone_reads_no_environment_and_load_settings_reads_os_environ(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(f"{ENV_PREFIX}BATCH__SIZE", "7")
    assert Settings().batch.size == 60
    assert Settings(batch={"size": 9}).batch.size == 9
    assert load_settings().batch.size == 7


def test_environment_values_are_parsed_by_the_field_type_never_as_yaml():
    settings = load_settings(environ={
        f"{ENV_PREFIX}BATCH__SIZE": "32",
        f"{ENV_PREFIX}BATCH__LINGER_S": "0.5",
        f"{ENV_PREFIX}STORAGE__ACCESS_KEY_ID": "0123",
        f"{ENV_PREFIX}CLUSTER__SCHEDULER": "tcp://h:8786",
        f"{ENV_PREFIX}MODEL__COMPILE": "true",
        f"{ENV_PREFIX}IMAGES__DRAFT": "0",
        f"{ENV_PREFIX}CLUSTER__GPU": "false",
        f"{ENV_PREFIX}FILTER__PREFIX": "# not a comment",
        "OTHER": "x",
    })
    assert settings.batch.size == 32 and settings.batch.linger_s == 0.5
    assert settings.storage.access_key_id == "0123"
    assert settings.cluster.scheduler == "tcp://h:8786"
    assert settings.model.compile is True and settings.images.draft is False and settings.cluster.gpu is False
    assert settings.filter.prefix == "# not a comment"


def test_variable_names_are_case_insensitive():
    assert load_settings(environ={"visionstream_batch__size": "12"}).batch.size == 12
    assert load_settings(environ={"VisionStream_Batch__Size": "13"}).batch.size == 13


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('[".jpg", ".png"]', (".jpg", ".png")),
        (".jpg,.png", (".jpg", ".png")),
        (" .jpg , .png ,", (".jpg", ".png")),
        (".jpg", (".jpg",)),
        ("", ()),
        ("[]", ()),
    ],
)
def test_lists_come_from_the_environment_as_json_or_comma_separated(value: str, expected: tuple[str, ...]):
    settings = load_settings(environ={f"{ENV_PREFIX}FILTER__SUFFIXES": value, f"{ENV_PREFIX}FILTER__BUCKETS": value})
    assert settings.filter.suffixes == expected and settings.filter.buckets == expected


def test_a_broken_json_list_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"FILTER__SUFFIXES\): filter\.suffixes: not a JSON array"):
        load_settings(environ={f"{ENV_PREFIX}FILTER__SUFFIXES": '[".jpg"'})


@pytest.mark.parametrize(
    "name",
    [f"{ENV_PREFIX}BATCH__SISE", f"{ENV_PREFIX}BACH__SIZE", f"{ENV_PREFIX}BATCH__SIZE__MAX", f"{ENV_PREFIX}BATCH"],
)
def test_an_unknown_setting_in_the_environment_is_an_error_naming_it(name: str):
    with pytest.raises(ConfigError, match=name) as raised:
        load_settings(environ={name: "3"})
    assert "\n" not in str(raised.value)


def test_prefixed_variables_without_the_delimiter_are_not_settings():
    # the compose file's substitution variables and cluster.py's worker count
    environ = {f"{ENV_PREFIX}LOCAL_WORKERS": "2", f"{ENV_PREFIX}WEIGHTS": "none", f"{ENV_PREFIX}BATCH_SIZE": "1"}
    assert load_settings(environ=environ) == load_settings(environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("batch:\n  size: 0\n", "batch.size"),
        ("batch:\n  sise: 3\n", "batch.sise: unknown setting"),
        ("bach:\n  size: 3\n", "bach: unknown setting"),
        ("model:\n  precision: fp8\n", "model.precision"),
        ("truth:\n  pattern: '(unclosed'\n", "truth.pattern"),
        ("truth:\n  pattern: 'n\\d+'\n", "wnid"),
        ("- a list\n", "mapping"),
        ("batch: [\n", "bad.yaml, line 2, column 1: not valid YAML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, fragment: str):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("\\", "\\\\").replace("(", "\\(")) as raised:
        load_settings(config, environ={})
    assert "\n" not in str(raised.value)


def test_a_bad_value_is_one_line_naming_its_source_and_key(tmp_path: Path):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={f"{ENV_PREFIX}KAFKA__SESSION_TIMEOUT_S": "0"})
    assert str(raised.value) == (
        "invalid configuration (VISIONSTREAM_KAFKA__SESSION_TIMEOUT_S): kafka.session_timeout_s: Input should be greater than 0"
    )
    config = tmp_path / "c.yaml"
    config.write_text("kafka:\n  session_timeout_s: 0\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(raised.value) == f"invalid configuration ({config}): kafka.session_timeout_s: Input should be greater than 0"
    with pytest.raises(ConfigError, match=r"^invalid configuration \(overrides\): batch\.size: "):
        Settings().with_overrides({"batch": {"size": 0}})


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_a_section_with_every_key_commented_out_is_empty(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("batch:\n  # size: 3\n")
    assert load_settings(config, environ={}).batch.size == 60


@pytest.mark.parametrize("secret", SECRETS)
def test_a_secret_from_the_environment_loads_verbatim_and_shows_nowhere(secret: str):
    settings = load_settings(environ={SECRET_KEY: secret, PASSWORD: secret})
    assert settings.storage.secret_access_key.get_secret_value() == secret
    assert settings.kafka.sasl_password.get_secret_value() == secret
    assert settings.storage.storage_options()["secret"] == secret
    assert settings.storage.boto3_kwargs()["aws_secret_access_key"] == secret
    shown = [
        repr(settings), str(settings), repr(settings.storage), str(settings.kafka),
        str(settings.model_dump(mode="json")), settings.model_dump_json(),
        yaml.safe_dump(settings.model_dump(mode="json")),
    ]
    assert not [text for text in shown if secret in text]
    for pickled in (pickle.dumps(settings), pickle.dumps(settings.storage), pickle.dumps(settings.kafka)):
        assert secret.encode() not in pickled
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={SECRET_KEY: secret, PASSWORD: secret, f"{ENV_PREFIX}BATCH__SIZE": "-1"})
    assert secret not in str(raised.value)


@pytest.mark.parametrize("spelling", ["0123", "null", "true", "[1, 2]", "", "~", "a: b", "- x", "!!binary x"])
def test_secrets_that_look_like_yaml_or_json_load_verbatim(spelling: str):
    assert load_settings(environ={PASSWORD: spelling}).kafka.sasl_password.get_secret_value() == spelling


@pytest.mark.parametrize(
    "text",
    [
        "kafka:\n  sasl_password: {pw: hunter2secret}\n",
        "kafka:\n  sasl_password: [hunter2secret]\n",
        "kafka:\n  sasl_password: *hunter2secret\n",
        "kafka:\n  sasl_password: !!python/name:hunter2secret\n",
        "storage:\n  secret_access_key: !hunter2secret x\n",
    ],
)
def test_a_secret_of_the_wrong_shape_in_a_file_stays_out_of_the_error(tmp_path: Path, text: str):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert "hunter2secret" not in str(raised.value) and "\n" not in str(raised.value)
    assert str(config) in str(raised.value)
    assert "hunter2secret" not in "".join(traceback.format_exception(raised.value))  # nor in a chained cause


def test_a_secret_yaml_would_read_as_a_number_is_refused_with_a_hint(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("storage:\n  secret_access_key: 0123\n")
    with pytest.raises(ConfigError, match=r"storage\.secret_access_key: Input should be a valid string \(in YAML, quote it\)"):
        load_settings(config, environ={})


def test_with_overrides_keeps_secrets():
    settings = load_settings(environ={SECRET_KEY: "hunter2", PASSWORD: "pw123"})
    copy = settings.with_overrides({"batch": {"size": 8}})
    assert copy.storage.secret_access_key.get_secret_value() == "hunter2"
    assert copy.kafka.sasl_password.get_secret_value() == "pw123"
    assert copy.batch.size == 8 and settings.batch.size == 60


def test_a_pickled_section_leaves_its_credentials_behind():
    settings = load_settings(environ={
        SECRET_KEY: "hunter2", f"{ENV_PREFIX}STORAGE__ACCESS_KEY_ID": "AKIDEXAMPLE", f"{ENV_PREFIX}STORAGE__BUCKET": "b",
        PASSWORD: "pw123", f"{ENV_PREFIX}KAFKA__SASL_USERNAME": "user",
    })
    restored = pickle.loads(pickle.dumps(settings))
    assert restored.storage == settings.storage.without_credentials()
    assert restored.storage.bucket == "b" and restored.storage.access_key_id is None and restored.storage.secret_access_key is None
    assert restored.kafka.sasl_password is None and restored.kafka.sasl_username is None
    assert restored.batch == settings.batch
    assert settings.storage.secret_access_key.get_secret_value() == "hunter2"  # the original keeps them


def test_without_credentials_is_a_copy_without_keys():
    storage = StorageSettings(bucket="b", access_key_id="AKID", secret_access_key="hunter2", region="eu-west-1")
    stripped = storage.without_credentials()
    assert (stripped.access_key_id, stripped.secret_access_key) == (None, None)
    assert (stripped.bucket, stripped.region) == ("b", "eu-west-1")
    assert "hunter2" not in str(stripped.storage_options())


def test_filter_accepts_prefix_and_suffixes_case_insensitively():
    settings = Settings().with_overrides({"filter": {"prefix": "dogs/", "suffixes": [".jpg"]}})
    assert settings.filter.accepts("dogs/a/B.JPG")
    assert not settings.filter.accepts("cats/a.jpg")
    assert not settings.filter.accepts("dogs/readme.txt")


def test_secrets_reach_a_child_through_the_environment_not_a_dumped_config():
    settings = load_settings(environ={SECRET_KEY: "hunter2"})
    assert "hunter2" not in yaml.safe_dump(settings.model_dump(mode="json"))
    env = settings.secrets_env()
    assert env == {SECRET_KEY: "hunter2"}
    assert load_settings(environ=env).storage.secret_access_key.get_secret_value() == "hunter2"


@functools.cache
def placeholder_outputs() -> tuple[str, str, str]:
    """repr and two errors with a fixed password: a secret adds nothing when these stay equal."""
    def error(environ: dict[str, str]) -> str:
        with pytest.raises(ConfigError) as raised:
            load_settings(environ=environ)
        return str(raised.value)

    placeholder = {PASSWORD: "placeholder"}
    return (
        repr(load_settings(environ=placeholder)),
        error({**placeholder, f"{ENV_PREFIX}BATCH__SIZE": "0"}),
        error({**placeholder, f"{ENV_PREFIX}BATCH__SISE": "3"}),
    )


@hypothesis_settings(max_examples=40, deadline=None)
@given(password=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1))  # SecretStr shows "" as empty
@example(password="*Sup3rSecretPa55")
@example(password="pa ss #x")
def test_any_printable_password_round_trips_and_shows_in_no_repr_or_error(password: str):
    expected_repr, expected_bad_value, expected_unknown = placeholder_outputs()
    environ = {PASSWORD: password}
    settings = load_settings(environ=environ)
    assert settings.kafka.sasl_password.get_secret_value() == password
    assert repr(settings) == expected_repr
    with pytest.raises(ConfigError) as bad_value:
        load_settings(environ={**environ, f"{ENV_PREFIX}BATCH__SIZE": "0"})
    assert str(bad_value.value) == expected_bad_value
    with pytest.raises(ConfigError) as unknown:
        load_settings(environ={**environ, f"{ENV_PREFIX}BATCH__SISE": "3"})
    assert str(unknown.value) == expected_unknown
    if len(password) > 3 and password not in "".join(placeholder_outputs()):
        assert not [text for text in (repr(settings), str(bad_value.value), str(unknown.value)) if password in text]

