"""The extras install together: pip resolves ``.[gpu,test]`` under requirements/constraints.txt,
and the plain package without constraints, quickly (no backtracking through releases).

These ask the package index (PyPI or the configured mirror) and take a minute or more each:
marked ``slow``, and skipped, saying why, where no index answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless the index serves dask-cuda, the package these resolutions need from it."""
    folder = tmp_path_factory.mktemp("probe")
    try:
        probe = subprocess.run(
            [*PIP, "download", "--no-deps", "--no-cache-dir", "--timeout", "10", "--retries", "0", "-d", str(folder), "dask-cuda==26.10.0"],
            capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("no package index reachable: `pip download dask-cuda` did not answer within 60 s")
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no package index reachable: `pip download dask-cuda` failed ({reason})")


def dry_run(*requirement: str, constraints: bool) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [*PIP, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    if constraints:
        command += ["-c", str(ROOT / "requirements" / "constraints.txt")]
    started = time.perf_counter()
    done = subprocess.run([*command, *requirement], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return done, time.perf_counter() - started


def installed(report: str) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report)["install"]}


@pytest.mark.slow
def test_gpu_and_test_extras_resolve_under_the_constraints(package_index: None):
    done, _ = dry_run(".[gpu,test]", constraints=True)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = installed(done.stdout)
    assert versions["dask-cuda"].startswith("26.10.")
    assert versions["dask"] == versions["distributed"] == "2026.7.1"  # what rapids-dask-dependency 26.10 pins


@pytest.mark.slow
def test_the_package_resolves_without_constraints_and_without_backtracking(package_index: None):
    done, seconds = dry_run(".", constraints=False)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = installed(done.stdout)
    assert versions["botocore"] == versions["boto3"]  # boto3 X.Y.Z pins botocore X.Y.Z
    # backtracking through dask / s3fs / fsspec releases took 4 to 14 minutes; resolving is
    # about a minute where the index is near (mostly downloading metadata)
    assert seconds < 300, f"resolution took {seconds:.0f} s: pip is backtracking again"


def pins(text: str) -> dict[str, str]:
    """``name==version`` pins in a requirements file or a pip command line, by normalised name."""
    import re

    return {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, version in re.findall(r"(?m)(?:^|\s)([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\\]*)", text)
    }


def test_gpu_machine_wheels_are_the_constrained_versions():
    """What benchmarks/fetch_gpu_wheels.sh carries to the GPU machine is what constraints.txt
    pins here (the shared script's list too, where this checkout has it beside it)."""
    constraints = pins((ROOT / "requirements" / "constraints.txt").read_text())
    scripts = [ROOT / "benchmarks" / "fetch_gpu_wheels.sh", ROOT.parent / "shared" / "gpu" / "fetch-wheels.sh"]
    carried: dict[str, str] = {}
    for script in scripts:
        if script.exists():
            carried |= pins(script.read_text())
    assert {"pydantic-settings", "tenacity", "prometheus-client", "hypothesis"} <= set(carried)
    mismatched = {name: (version, constraints[name]) for name, version in carried.items() if name in constraints and constraints[name] != version}
    assert not mismatched, f"carried version vs constraints.txt: {mismatched}"
