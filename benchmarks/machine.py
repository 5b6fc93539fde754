"""The machine a figure was measured on, named the same way by every benchmark."""

from __future__ import annotations

import platform

from inference.worker.cpu import cpu_field


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    return cpu_field("model name") or platform.processor() or "unknown CPU"
