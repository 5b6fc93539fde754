import importlib.resources
from pathlib import Path

import pytest
import yaml

import inference
from inference.errors import ConfigError
from inference.settings import DEFAULT_CONFIG, Settings, env_overrides, load_settings


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
    assert (Path(__file__).resolve().parents[2] / "configs" / "default.yaml").resolve() == DEFAULT_CONFIG


def test_precedence_is_defaults_then_config_file_then_environment(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("batch:\n  size: 32\n  linger_s: 5\nmodel:\n  name: resnet18\n")
    settings = load_settings(config, environ={"VISIONSTREAM_BATCH__SIZE": "16"})
    assert settings.batch.size == 16  # environment beats the file
    assert settings.batch.linger_s == 5.0  # the file beats the defaults
    assert settings.model.name == "resnet18"
    assert settings.batch.max_in_flight == 2  # untouched default


def test_env_overrides_nest_and_parse_yaml_scalars():
    tree = env_overrides({"VISIONSTREAM_CLUSTER__SCHEDULER": "tcp://h:8786", "VISIONSTREAM_MODEL__COMPILE": "true", "OTHER": "x"})
    assert tree == {"cluster": {"scheduler": "tcp://h:8786"}, "model": {"compile": True}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("batch:\n  size: 0\n", "batch.size"),
        ("batch:\n  sise: 3\n", "batch.sise"),
        ("model:\n  precision: fp8\n", "model.precision"),
        ("truth:\n  pattern: '(unclosed'\n", "truth.pattern"),
        ("truth:\n  pattern: 'n\\d+'\n", "wnid"),
        ("- a list\n", "mapping"),
        ("batch: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, fragment: str):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("\\", "\\\\").replace("(", "\\(")):
        load_settings(config, environ={})


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_secrets_never_show_in_repr_or_dumps():
    settings = load_settings(environ={"VISIONSTREAM_STORAGE__SECRET_ACCESS_KEY": "hunter2", "VISIONSTREAM_KAFKA__SASL_PASSWORD": "pw123"})
    assert "hunter2" not in repr(settings) and "pw123" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump(mode="json"))
    assert settings.storage.storage_options()["secret"] == "hunter2"
    copy = settings.with_overrides({"batch": {"size": 8}})
    assert copy.storage.secret_access_key.get_secret_value() == "hunter2"
    assert copy.kafka.sasl_password.get_secret_value() == "pw123"


def test_filter_accepts_prefix_and_suffixes_case_insensitively():
    settings = Settings().with_overrides({"filter": {"prefix": "dogs/", "suffixes": [".jpg"]}})
    assert settings.filter.accepts("dogs/a/B.JPG")
    assert not settings.filter.accepts("cats/a.jpg")
    assert not settings.filter.accepts("dogs/readme.txt")


def test_secrets_reach_a_child_through_the_environment_not_a_dumped_config():
    settings = load_settings(environ={"VISIONSTREAM_STORAGE__SECRET_ACCESS_KEY": "hunter2"})
    assert "hunter2" not in yaml.safe_dump(settings.model_dump(mode="json"))
    env = settings.secrets_env()
    assert env == {"VISIONSTREAM_STORAGE__SECRET_ACCESS_KEY": "hunter2"}
    assert load_settings(environ=env).storage.secret_access_key.get_secret_value() == "hunter2"
