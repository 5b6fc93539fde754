"""The stream side of visionstream, in three layers whose imports run one way.

    streams.cli       the ``visionstream`` commands and what they print (thin)
      ├─► streams.service   the running service: S3 events in, batches to ``inference``,
      │                     prediction and dead-letter events out; uploads and backfill
      └─► streams.embedded  tooling: the loopback broker, S3 server and processes, the demo,
                            generated sample images; used by the demo, benchmarks and tests
    streams.errors    the error tree of all three

``streams.embedded`` uses ``streams.service``; ``streams.service`` imports neither of the
others; everything here may use ``inference``, which never imports ``streams``.

The stable Python API of this side: ``read_predictions`` (``streams.service.readback``), the
output topics as a DataFrame; ``inference`` holds the rest (``classify``, ``accuracy_report``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["read_predictions"]


def __getattr__(name: str) -> Any:
    """Imported when first used: the ``visionstream`` command stays quick to start."""
    if name == "read_predictions":
        from streams.service.readback import read_predictions

        return read_predictions
    raise AttributeError(f"module 'streams' has no attribute {name!r}")
