"""Shared test helpers: a `gpu` marker that skips without CUDA.

The tests start many short-lived Dask workers; on a CPU with native bf16, ``model.compile: auto``
would have each of them compile in the background beside the tests (tens of seconds of both
cores each). The commands they run read this; the compiled path has tests of its own."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VISIONSTREAM_MODEL__COMPILE", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`: a folder named gpu would match
            item.add_marker(skip)
