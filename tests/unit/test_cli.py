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
