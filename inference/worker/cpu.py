"""This machine's CPU as ``/proc/cpuinfo`` describes it: the one reader of that file, for every
question asked of it (native bf16, the compiled packages' key, the name a benchmark prints).
Elsewhere (no ``/proc``) every answer is empty."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

IDENTITY_FIELDS = ("model name", "flags", "Features", "CPU part")  # what a compiled package depends on


@lru_cache(maxsize=1)
def cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_field(name: str) -> str:
    """The first processor's ``name`` field ("model name", "flags"...), "" where there is none."""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.split(":", 1)[0].strip() == name), "")


def cpu_has_native_bf16() -> bool:
    """AVX-512 bf16 or AMX: bf16 matrix arithmetic in hardware (else torch emulates it, slower than fp32)."""
    flags = cpuinfo()
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cpu_identity() -> str:
    """The CPU's model name and feature flags, every distinct line of them (empty elsewhere)."""
    lines = cpuinfo().splitlines()
    return "|".join(sorted({line.strip() for line in lines if line.split(":", 1)[0].strip() in IDENTITY_FIELDS}))
