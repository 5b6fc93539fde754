"""The Python API, for notebooks and scripts: classify on your own Dask client, rows as a
DataFrame, the accuracy report. Re-exported by ``inference`` (the stable names are in its
``__all__``); everything else in the package is internal.

    from distributed import Client
    from inference import classify, accuracy_report

    client = Client("tcp://scheduler:8786")
    df = classify("s3://images/dogs/", client=client)
    accuracy_report(df)

The work runs on an event loop of its own, in a thread: Jupyter's running loop is never
blocked or re-entered. On the caller's client it registers the model plugin (the same resident
model the stream worker uses, kept for the next call) and leaves nothing else behind; without a
client it starts an embedded cluster for the call and closes it after. Interrupting (Ctrl-C,
the notebook's stop button) cancels the batches in flight and leaves the client usable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.client.cluster import InferenceCluster
from inference.errors import WeightsUnavailable
from inference.records.evaluation import Outcome, summarize
from inference.client.job import batches_in_flight, classify_all
from inference.records.report import figures, headline, write_report
from inference.records.results import ImageResult
from inference.settings import Settings, load_settings
from inference.client.sources import iter_sources

if TYPE_CHECKING:
    import pandas

# The DataFrame's columns, in order, and their pandas dtypes (nullable: a failed image has no
# prediction, an image outside the truth pattern no truth).
COLUMNS: dict[str, str] = {
    "uri": "string",
    "name": "string",
    "label": "string",  # the predicted class
    "wnid": "string",
    "class_index": "Int64",
    "score": "Float64",  # its softmax probability
    "top_k": "object",  # [{"class_index", "wnid", "label", "score"}, ...], best first
    "truth_wnid": "string",  # from the key (truth.pattern)
    "truth_label": "string",
    "match": "boolean",  # predicted wnid == truth wnid; <NA> without truth or with an error
    "error_stage": "string",  # fetch | decode | ...; <NA> for a classified image
    "error_message": "string",
    "fetch_ms": "Float64",  # the image's batch, stage by stage
    "decode_ms": "Float64",
    "queue_ms": "Float64",
    "inference_ms": "Float64",
    "batch_size": "Int64",
    "model": "string",
    "weights": "string",
    "precision": "string",
    "device": "string",
    "model_version": "string",  # the weights actually loaded (their SHA-256; the events' model.version)
    "worker": "string",  # the Dask worker that classified it
}
_DONE = object()
CANCEL_WAIT_S = 30.0  # for batches in flight to be cancelled on the cluster


def iter_classify(
    sources: str | Iterable[str],
    *,
    client: Any = None,
    model: str | None = None,
    weights: str | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    progress: bool = True,
    config: str | Path | None = None,
) -> Iterator[dict[str, Any]]:
    """Each image's row (``COLUMNS``) as its batch completes, in order of completion.

    ``sources``: what ``visionstream classify`` takes (a file, folder, glob, ``s3://`` prefix)
    or a list of them, or of object URIs. ``client``: a ``distributed.Client`` to run on (None:
    an embedded cluster for this call). Settings are found as the commands find them: the
    defaults, the file ``VISIONSTREAM_CONFIG`` names, ``config`` (a YAML file, as ``--config``)
    on top, the ``VISIONSTREAM_*`` environment, then the keyword arguments that are given
    (``model``, ``weights``, ``batch_size``, ``precision``; unset, the settings' values:
    resnet50, DEFAULT, 60, auto by default). A bad image is a row with ``error_stage`` set,
    never an exception; a bad argument raises ValueError naming it; a source that names nothing
    raises SourceError.
    """
    settings = _settings(model=model, weights=weights, batch_size=batch_size, precision=precision, config=config)
    names = [sources] if isinstance(sources, str | Path) else [str(source) for source in sources]
    if not names:
        raise ValueError("sources: give at least one file, folder, glob or s3:// prefix")
    uris = iter_sources([str(name) for name in names], settings.storage, settings.filter.suffixes)
    first = next(uris, None)  # a source that names nothing fails here, in the caller's frame
    if first is None:
        return
    cluster = _cluster(settings, client)
    results: queue.Queue[Any] = queue.Queue()

    async def run() -> None:
        async with cluster:
            threads = sum((await cluster.threads()).values())
            await classify_all(cluster, _chain(first, uris), settings.batch.size, batches_in_flight(settings.batch.max_in_flight, threads), results.put)

    loop = _Loop()
    job = loop.submit(run())
    job.add_done_callback(lambda _: results.put(_DONE))
    bar = _progress(progress)
    try:
        while (result := _next(results)) is not _DONE:
            if bar is not None:
                bar.update(1)
            yield row(result)
        try:
            job.result()  # the job's own error (the cluster gone, retries spent), as the CLI reports it
        except WeightsUnavailable as exc:  # its hint in this interface's words
            raise WeightsUnavailable(exc.spec, exc.reason, option="weights=") from None  # the same error, reworded: once is enough
    finally:
        if bar is not None:
            bar.close()
        if not job.done():  # interrupted, or the caller stopped iterating: cancel what is in flight
            job.cancel()
            concurrent.futures.wait([job], timeout=CANCEL_WAIT_S)
        loop.close()


def classify(sources: str | Iterable[str], **options: Any) -> pandas.DataFrame:
    """Every image's row (``COLUMNS``, with their dtypes) in one DataFrame, in order of
    completion; the options are ``iter_classify``'s."""
    return to_frame(iter_classify(sources, **options))


def to_frame(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, str] = COLUMNS) -> pandas.DataFrame:
    """Rows (``iter_classify``'s, or any with ``columns``) as a DataFrame with those columns and dtypes."""
    import pandas

    frame = pandas.DataFrame(list(rows), columns=list(columns))
    return frame.astype({name: dtype for name, dtype in columns.items() if dtype != "object"})


def row(result: ImageResult) -> dict[str, Any]:
    """One image's record, flat. Pure."""
    prediction, truth, error, timings, model = result.prediction, result.ground_truth, result.error, result.timings, result.model
    return {
        "uri": result.uri,
        "name": result.name,
        "label": prediction.label if prediction else None,
        "wnid": prediction.wnid if prediction else None,
        "class_index": prediction.class_index if prediction else None,
        "score": prediction.score if prediction else None,
        "top_k": [{"class_index": p.class_index, "wnid": p.wnid, "label": p.label, "score": p.score} for p in result.top_k],
        "truth_wnid": truth.wnid if truth else None,
        "truth_label": truth.label if truth else None,
        "match": result.match,
        "error_stage": error.stage if error else None,
        "error_message": error.message if error else None,
        "fetch_ms": timings.fetch_ms,
        "decode_ms": timings.decode_ms,
        "queue_ms": timings.queue_ms,
        "inference_ms": timings.inference_ms,
        "batch_size": timings.batch_size,
        "model": model.name,
        "weights": model.weights,
        "precision": model.precision,
        "device": model.device,
        "model_version": model.version,
        "worker": result.worker,
    }


@dataclass(frozen=True)
class AccuracyReport:
    """What ``visionstream evaluate`` computes. ``summary`` holds every figure; a notebook
    shows the headline, the per-class table and the charts; ``save`` writes the report folder."""

    summary: dict[str, Any]

    @property
    def top1(self) -> float | None:
        return self.summary["top1_accuracy"]

    @property
    def top5(self) -> float | None:
        return self.summary["top5_accuracy"]

    def per_class(self) -> pandas.DataFrame:
        import pandas

        rows = [{"wnid": wnid, **entry} for wnid, entry in self.summary["per_class"].items()]
        return pandas.DataFrame(rows, columns=["wnid", "label", "images", "correct", "accuracy"])

    def confusions(self) -> pandas.DataFrame:
        import pandas

        return pandas.DataFrame(self.summary["confusions"], columns=["truth", "predicted", "count"])

    def figures(self) -> dict[str, Any]:
        """``per_class_accuracy``, ``score_histogram``, ``reliability``: matplotlib figures."""
        return figures(self.summary)

    def save(self, folder: str | Path, source: str = "python") -> list[Path]:
        return write_report(self.summary, folder, source)

    def __repr__(self) -> str:
        return headline(self.summary)

    def _ipython_display_(self) -> None:
        from IPython.display import Markdown, display

        display(Markdown("```\n" + headline(self.summary) + "\n```"))
        display(self.per_class())
        for figure in self.figures().values():
            display(figure)


def accuracy_report(results: Any) -> AccuracyReport:
    """The accuracy figures of ``classify``'s DataFrame, or of rows or records (``iter_classify``,
    ``visionstream classify`` JSON lines, prediction and dead-letter events); the latest per URI."""
    latest: dict[str, Outcome] = {}
    for record in _records(results):
        found = _outcome(record)
        if found is not None:
            latest[found.uri] = found
    return AccuracyReport(summarize(latest.values()))


def _records(results: Any) -> Iterable[Mapping[str, Any]]:
    if hasattr(results, "to_dict") and hasattr(results, "columns"):  # a DataFrame
        return results.astype(object).where(results.notna(), None).to_dict("records")
    if isinstance(results, Mapping):
        raise ValueError("results: give a DataFrame or a list of rows/records, not one record")
    return list(results)


def _outcome(record: Mapping[str, Any]) -> Outcome | None:
    """A flat row (``COLUMNS``) or any record shape ``evaluate`` reads."""
    from inference.records.evaluation import outcome

    if "prediction" in record or "schema" in record or "ground_truth" in record:
        return outcome(dict(record))
    uri = record.get("uri")
    if not uri:
        return None
    error = f"{record.get('error_stage')}: {record.get('error_message')}" if record.get("error_stage") else None
    return Outcome(
        uri=uri, predicted_wnid=record.get("wnid"), predicted_label=record.get("label"), score=record.get("score"),
        top_wnids=tuple(p.get("wnid") for p in record.get("top_k") or ()), truth_wnid=record.get("truth_wnid"),
        truth_label=record.get("truth_label"), error=error, latency_ms=None,
        model={"name": record.get("model"), "weights": record.get("weights"), "version": record.get("model_version")} if record.get("model") else None,
    )


def _settings(*, model: str | None, weights: str | None, batch_size: int | None, precision: str | None, config: str | Path | None) -> Settings:
    """The settings the commands would find (``load_settings`` with ``VISIONSTREAM_CONFIG``),
    with the keyword arguments that were given on top."""
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size: a whole number of images, 1 or more (got {batch_size!r})")
    if precision is not None and precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision: one of auto, fp32, bf16, fp16 (got {precision!r})")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"model: a torchvision model name such as 'resnet50' (got {model!r})")
    if weights is not None and (not isinstance(weights, str) or not weights.strip()):
        raise ValueError(f"weights: DEFAULT, a torchvision weights name, a checkpoint path or s3:// URI, or none (got {weights!r})")
    settings = load_settings(config, config_env=True)
    given = {"name": model, "weights": weights, "precision": precision}
    overrides: dict[str, Any] = {"model": {key: value for key, value in given.items() if value is not None}}
    if batch_size is not None:
        overrides["batch"] = {"size": batch_size}
    return settings.with_overrides(overrides, source="keyword arguments")


def _cluster(settings: Settings, client: Any) -> InferenceCluster:
    """On ``client``'s scheduler, with its security; or an embedded cluster."""
    cluster = InferenceCluster.from_settings(settings)
    if client is None:
        return cluster
    address = getattr(getattr(client, "scheduler", None), "address", None)
    if not address:
        raise ValueError("client: a connected distributed.Client (its scheduler has no address)")
    cluster.settings = settings.cluster.model_copy(update={"scheduler": address, "tls_ca": None, "tls_cert": None, "tls_key": None})
    cluster.security = getattr(client, "security", None)
    return cluster


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _next(results: queue.Queue[Any]) -> Any:
    """The next result; short waits, so that an interrupt reaches the caller at once."""
    while True:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            continue


def _progress(wanted: bool) -> Any:
    if not wanted:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="classify", unit="img", disable=None)  # None: no bar where output is not interactive


class _Loop:
    """An event loop in a thread of its own: the asynchronous Dask client lives there,
    whatever loop the caller's thread runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="visionstream-classify", daemon=True)
        self.thread.start()

    def submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=CANCEL_WAIT_S)
        if not self.thread.is_alive():
            self.loop.close()
