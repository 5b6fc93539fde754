"""Shared test helpers: a `gpu` marker that skips without CUDA, and an empty compile cache.

The suite runs the shipped defaults, ``model.compile: auto`` included: every Dask worker it starts
has its compiled forward built (in a process of its own, beside the batches it serves) or loads
it from the cache. That cache starts empty for each test session (a cold start, as a new user's
first run), is shared by the session's processes through ``VISIONSTREAM_MODEL__COMPILE_CACHE_DIR``
(so each package is built once per session) and is removed at its end. A test that turns compile
off says why where it does."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.pop("VISIONSTREAM_CONFIG", None)  # a shell that followed README's `export` must not reach the tests
COMPILE_CACHE = tempfile.mkdtemp(prefix="visionstream-test-compiled-")
os.environ["VISIONSTREAM_MODEL__COMPILE_CACHE_DIR"] = COMPILE_CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`: a folder named gpu would match
            item.add_marker(skip)
