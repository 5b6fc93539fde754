"""visionstream's inference side: the model, images, the Dask cluster, records and reports.

The stable Python API (``inference.client.notebook``); everything else is internal:

    classify(sources, *, client=None, model=None, weights=None, batch_size=None,
             precision=None, progress=True, config=None) -> pandas.DataFrame
                         (None: the settings' value; found as the commands find them)
    iter_classify(...)   the same rows, as their batches complete
    accuracy_report(df)  -> AccuracyReport (top1, top5, per_class(), confusions(), figures(), save())
    COLUMNS              the DataFrame's columns and dtypes

``read_predictions`` (the predictions topic as a DataFrame) is ``streams``': this package
never talks to Kafka.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COLUMNS", "AccuracyReport", "accuracy_report", "classify", "iter_classify"]


def __getattr__(name: str) -> Any:
    """Imported when first used: ``import inference`` stays light for the Dask workers."""
    if name in __all__:
        from inference.client import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
