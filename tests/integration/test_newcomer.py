"""README's "Using it", as a newcomer runs it: `visionstream stack` in one shell, the other
commands in another with VISIONSTREAM_CONFIG, no --config anywhere, no AWS_* in the environment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.embedded.samples import generate_dataset
from streams.embedded.stack import free_port

from .conftest import REPO


@pytest.mark.slow  # about a minute: the stack, a worker with its own cluster: `make test-slow` (CI runs both)
def test_the_readme_flow_runs_as_written_against_visionstream_stack(tmp_path: Path):
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "VISIONSTREAM_", "KAFKA_"))}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    config = tmp_path / "visionstream-stack.yaml"
    stack = subprocess.Popen([sys.executable, "-m", "streams", "stack", "--config-out", str(config)],
                             cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not config.exists():
            assert stack.poll() is None and time.monotonic() < deadline, stack.stderr.read() if stack.poll() is not None else "no config file"
            time.sleep(0.2)
        assert config.stat().st_mode & 0o077 == 0  # the local S3 server's credentials: its owner's only
        using = env | {"VISIONSTREAM_CONFIG": str(config)}

        def visionstream(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "streams", *args], capture_output=True, text=True, cwd=REPO, env=using, timeout=timeout_s)

        generate_dataset(tmp_path / "dataset", 4)
        done = visionstream("upload", str(tmp_path / "dataset" / "Images"), "--prefix", "dogs/", "--notify")
        assert done.returncode == 0, done.stderr
        worker = subprocess.Popen([sys.executable, "-m", "streams", "worker"], cwd=REPO, env=using | {"VISIONSTREAM_WORKER__WEB_PORT": str(free_port())},
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w"))  # noqa: SIM115
        tail = visionstream("tail", "--from-beginning", "--json", "--limit", "4", "--idle", "120")
        assert tail.returncode == 0, tail.stderr + (tmp_path / "worker.log").read_text()[-3000:]
        events = [json.loads(line) for line in tail.stdout.splitlines()]
        assert len(events) == 4 and all(event["uri"].startswith("s3://images/dogs/Images/") for event in events)
        report = visionstream("evaluate", "--from-beginning", "--idle", "3", "--output", str(tmp_path / "report"))
        assert report.returncode == 0 and re.search(r"^images\s+4$", report.stdout, re.M), report.stdout + report.stderr
        dry = visionstream("reconcile", "s3://images/dogs/", "--dry-run", "--min-age", "0", "--idle", "2")
        assert dry.returncode == 0 and dry.stdout == "", dry.stderr
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        stack.send_signal(signal.SIGINT)
        _, stderr = stack.communicate(timeout=60)
    assert stack.returncode == 0 and "stack stopped" in stderr, stderr
    worker_log = (tmp_path / "worker.log").read_text()
    assert worker.returncode == 0 and "level=ERROR" not in worker_log and "Traceback" not in worker_log, worker_log[-3000:]  # a clean SIGTERM
    assert "Traceback" not in stderr and not config.exists()


@pytest.mark.slow  # the whole demo: broker, S3, Dask and a stream worker, about a minute
def test_make_demo_with_the_shipped_defaults_from_an_empty_compile_cache(tmp_path: Path):
    """`visionstream demo` as `make demo` runs it: every default (model.compile auto included),
    from an empty compile cache, so its Dask worker builds packages beside the batches it
    serves; every image is accounted for, and the worker's log says how its model runs."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "VISIONSTREAM_", "KAFKA_"))}
    cache = tmp_path / "compiled"
    env |= {"VISIONSTREAM_MODEL__COMPILE_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "streams", "demo", "--count", "30"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"images\s+(\d+) of \1 accounted for", done.stdout + done.stderr), done.stdout[-3000:]
    assert re.search(r"model resnet50 runs eagerly on cpu at \w+ while its compiled forward \(shapes [\d+]+\) is loaded or built", done.stderr), done.stderr[-4000:]
    assert not any(line.startswith("Traceback") for line in done.stderr.splitlines()), done.stderr[-4000:]
