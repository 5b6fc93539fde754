"""The entry point: distributed's log level set through dask's configuration, not the environment."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import logging, os
from streams.cli.main import quiet_distributed_logging
quiet_distributed_logging()
import distributed
print(logging.getLevelName(logging.getLogger("distributed").level), "DASK_LOGGING__DISTRIBUTED" in os.environ)
"""


@pytest.mark.parametrize(("variable", "expected"), [(None, "WARNING False"), ("info", "INFO True")])
def test_distributed_logs_warnings_unless_dask_config_says_otherwise(variable, expected):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    if variable is not None:
        env["DASK_LOGGING__DISTRIBUTED"] = variable
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == expected


def test_the_console_script_and_python_m_streams_name_the_same_main():
    import importlib
    import tomllib

    import streams.__main__

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["visionstream"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is streams.__main__.main


def visionstream(*args: str, **options) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams", *args], capture_output=True, text=True, cwd=REPO, timeout=120, **options)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read (No such file or directory)"),
        ('{"uri": "a", "error": null}\nnot json\n', "line 2: not JSON"),
        ("[1, 2]\n", "line 1: a JSON list, not a record"),
        ('{"uri": "s3://b/a.jpg", "prediction": null, "error": null}\n{}\n', "line 2: not a `visionstream classify` record"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_evaluate_input_problems_are_one_line_naming_the_file(tmp_path, content, says):
    path = tmp_path / "p.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    done = visionstream("evaluate", "--input", str(path), "--output", str(tmp_path / "report"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"visionstream: error: {path}") and says in line


def test_an_unknown_option_shows_the_commands_own_usage():
    done = visionstream("classify", "--bogus", "x")
    assert done.returncode == 2 and "usage: visionstream classify" in done.stderr and "--bogus" in done.stderr


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tmp_path):
    """`visionstream ... | head -1`: the rest of the output has nowhere to go; no traceback, status 0."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"uri": "s3://b/n02085620-Chihuahua/a.jpg", "error": null, "prediction": {"wnid": "n02085620", "label": "Chihuahua", "score": 0.9}, "top_k": [], "ground_truth": {"wnid": "n02085620", "label": "Chihuahua"}, "match": true}\n')
    process = subprocess.Popen([sys.executable, "-m", "streams", "evaluate", "--input", str(path), "--output", str(tmp_path / "r")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True)
    process.stdout.close()  # before it writes a line
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


UNREACHABLE = {
    "VISIONSTREAM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9", "VISIONSTREAM_STORAGE__ENDPOINT_URL": "http://127.0.0.1:9",
    "VISIONSTREAM_STORAGE__REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
}


UNREACHABLE_CASES = [
    (["tail", "--idle", "2"], "Kafka at 127.0.0.1:9 unavailable"),
    (["evaluate", "--idle", "2"], "Kafka at 127.0.0.1:9 unavailable"),
    (["backfill", "s3://images/dogs/"], "Kafka at 127.0.0.1:9 unavailable"),
    (["backfill", "s3://images/dogs/", "--dry-run"], "cannot list"),
    (["reconcile", "s3://images/dogs/", "--dry-run"], "Kafka at 127.0.0.1:9 unavailable"),
    (["upload", "README.md"], "cannot reach the object store at http://127.0.0.1:9"),
    (["classify", "s3://images/dogs/", "--scheduler", "tcp://127.0.0.1:9"], "cannot list"),
    (["lag"], "Kafka at 127.0.0.1:9 unavailable"),
]


def answers_with_one_line(cases: list[tuple[list[str], str]]) -> None:
    """Run the commands side by side (each mostly waits: imports, retries), then check each."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda case: visionstream(*case[0], env=os.environ | UNREACHABLE), cases))
    for (args, says), done in zip(cases, runs, strict=True):
        assert done.returncode == 1 and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        [line] = [line for line in done.stderr.splitlines() if line.startswith("visionstream: error:")]
        assert says in line, (args, line)


def test_every_command_answers_an_unreachable_broker_or_store_with_one_line():
    answers_with_one_line(UNREACHABLE_CASES)


@pytest.mark.slow  # imports Faust and torch: 15 s
def test_the_worker_answers_an_unreachable_broker_with_one_line():
    answers_with_one_line([(["worker"], "Kafka at 127.0.0.1:9 unavailable")])


def test_a_stale_visionstream_config_is_named_and_stack_does_not_read_it(tmp_path):
    import os

    gone = tmp_path / "gone.yaml"
    done = visionstream("evaluate", "--input", str(tmp_path / "x.jsonl"), env=os.environ | {"VISIONSTREAM_CONFIG": str(gone)})
    assert done.returncode == 1 and "named by VISIONSTREAM_CONFIG" in done.stderr
    done = visionstream("stack", "--config-out", str(tmp_path / "no" / "folder.yaml"), env=os.environ | {"VISIONSTREAM_CONFIG": str(gone)})
    assert done.returncode == 1 and "no folder" in done.stderr and "gone.yaml" not in done.stderr  # checked before any server starts


def test_the_stack_config_is_its_owners_alone_whatever_was_there(tmp_path):
    import os
    import stat

    from streams.embedded.serve import write_config

    existing = tmp_path / "open.yaml"
    existing.write_text("old")
    existing.chmod(0o644)
    target = tmp_path / "elsewhere.yaml"
    target.write_text("not to be touched")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    for path in (existing, link):
        write_config(path, {"storage": {"bucket": "images"}})
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and not path.is_symlink()
        assert "bucket: images" in path.read_text()
    assert target.read_text() == "not to be touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.yaml", "link.yaml", "open.yaml"]  # no temporary left


def test_a_bad_variable_is_blamed_on_the_variable_not_on_the_config_file_set_beside_it(tmp_path):
    import os

    config = tmp_path / "stack.yaml"
    config.write_text("batch:\n  size: 10\n")
    done = visionstream("evaluate", "--input", str(tmp_path / "x.jsonl"),
                        env=os.environ | {"VISIONSTREAM_CONFIG": str(config), "VISIONSTREAM_BATCH__SZIE": "32"})
    [line] = done.stderr.splitlines()
    assert done.returncode == 1 and "(VISIONSTREAM_BATCH__SZIE): batch.szie: unknown setting" in line
    assert "named by VISIONSTREAM_CONFIG" not in line and "stack.yaml" not in line


def test_a_config_file_layers_on_the_one_visionstream_config_names(tmp_path):
    from inference.settings import load_settings

    stack = tmp_path / "stack.yaml"
    stack.write_text("model:\n  weights: none\nbatch:\n  size: 10\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("batch:\n  size: 12\n")
    both = load_settings(mine, environ={"VISIONSTREAM_CONFIG": str(stack)}, config_env=True)
    assert both.model.weights == "none" and both.batch.size == 12  # only the keys you change
    assert load_settings(mine, environ={"VISIONSTREAM_CONFIG": str(stack)}).model.weights == "DEFAULT"  # not asked to read it
    (tmp_path / "bad.yaml").write_text("batch:\n  size: -1\n")
    with pytest.raises(Exception, match=r"\(.*bad.yaml\): batch.size"):
        load_settings(tmp_path / "bad.yaml", environ={"VISIONSTREAM_CONFIG": str(stack)}, config_env=True)


def test_evaluate_that_matches_nothing_leaves_the_last_report_alone(tmp_path):
    records = tmp_path / "p.jsonl"
    records.write_text('{"uri": "s3://b/dogs/a.jpg", "prediction": null, "error": {"stage": "decode", "message": "x"}}\n')
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("the last good report")
    done = visionstream("evaluate", "--input", str(records), "--prefix", "s3://b/cats/", "--output", str(report))
    [line] = done.stderr.splitlines()
    assert done.returncode == 1 and "no records under --prefix 's3://b/cats/'" in line and "left as it was" in line
    assert (report / "report.md").read_text() == "the last good report"


def test_counts_read_in_the_singular_and_plural():
    from inference.errors import BatchTimeout
    from inference.records.report import plural

    assert (plural(1, "image"), plural(0, "image"), plural(2, "object")) == ("1 image", "0 images", "2 objects")
    assert "batch of 1 image did" in str(BatchTimeout(1, 5.0))


def test_a_weights_hint_names_the_option_of_the_interface_in_use():
    import pickle

    from inference.errors import WeightsUnavailable

    assert "--weights none" in str(WeightsUnavailable("x.pt", "checkpoint file not found"))
    api = WeightsUnavailable("x.pt", "checkpoint file not found", option="weights=")
    assert 'weights="none"' in str(api) and "--weights" not in str(api)
    assert str(pickle.loads(pickle.dumps(api))) == str(api)  # crosses the Dask boundary intact


def test_a_failed_connection_attempt_is_not_a_second_line_before_the_error():
    import logging

    from streams.service.logs import configure_logging

    configure_logging("INFO")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("aiokafka").error('Unable connect to "127.0.0.1:1": [Errno 111] Connect call failed')
        logging.getLogger("aiokafka").error("Unexpected error in heartbeat routine")
    finally:
        logging.getLogger().removeHandler(handler)
    assert [record.getMessage() for record in records] == ["Unexpected error in heartbeat routine"]


def test_a_cpu_host_is_not_told_that_no_cuda_runtime_is_found():
    import logging

    import inference.worker.compiled  # noqa: F401 - installs the filter, as every process that loads a package imports it

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for c++")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["Error checking compiler version for c++"]


def test_a_sasl_password_appears_in_no_output_even_at_debug():
    """The Kafka client options are built with SASL on, as a production config has them, and
    everything the commands print at DEBUG is read: the password is in none of it."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    secret = "Sasl-Pa55word-4f9c"
    sasl = UNREACHABLE | {
        "VISIONSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "VISIONSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "VISIONSTREAM_KAFKA__SASL_USERNAME": "svc", "VISIONSTREAM_KAFKA__SASL_PASSWORD": secret,
    }
    cases = [["tail", "--idle", "2"], ["lag"], ["backfill", "s3://images/dogs/"]]
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda args: visionstream(*args, "--log-level", "DEBUG", env=os.environ | sasl), cases))
    for args, done in zip(cases, runs, strict=True):
        assert done.returncode == 1, (args, done.stderr[-2000:])
        assert "sasl" in done.stderr.lower() or "Kafka at 127.0.0.1:9" in done.stderr, (args, done.stderr[-2000:])  # it did build them
        assert secret not in done.stdout + done.stderr, args


def test_upload_refuses_a_prefix_whose_keys_the_worker_would_refuse():
    done = visionstream("upload", "README.md", "--prefix", "../outside/")
    assert done.returncode == 2 and "--prefix '../outside/': object key has a '.' or '..' segment" in done.stderr


def test_a_bad_option_is_blamed_on_the_command_line():
    done = visionstream("classify", "README.md", "--batch-size", "0")
    [line] = done.stderr.splitlines()
    assert done.returncode == 1 and line.startswith("visionstream: error: invalid configuration (command-line options): batch.size")
