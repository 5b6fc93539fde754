"""What a worker's child processes get (the package build, the decoder server): an environment
of the few variables Python, torch and a compiler need, nothing else, so that no credential of
the worker's travels with them; and this package importable from a new interpreter."""

from __future__ import annotations

import os
import site
from pathlib import Path

ENV_KEPT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "CC", "CXX", "LD_LIBRARY_PATH", "VIRTUAL_ENV")
ENV_KEPT_PREFIXES = ("LC_", "PYTHON", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "CUDA_", "CONDA_")
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN")


def child_env() -> dict[str, str]:
    """The allowlisted part of this process's environment, less anything named like a secret,
    with the folder that holds ``inference`` on ``PYTHONPATH`` where a new interpreter would not
    find it (an editable install, a source tree)."""
    env = {name: value for name, value in os.environ.items() if name in ENV_KEPT or name.startswith(ENV_KEPT_PREFIXES)}
    env = {name: value for name, value in env.items() if not any(word in name.upper() for word in SECRET_WORDS)}
    source_root = str(Path(__file__).resolve().parents[2])  # the folder that holds the inference package
    if source_root not in _site_paths():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), source_root]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _site_paths() -> set[str]:
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    return {str(Path(path).resolve()) for path in paths}
