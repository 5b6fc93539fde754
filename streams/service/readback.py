"""The output topics as a table: ``read_predictions``, the stream's half of the Python API
(``inference`` never talks to Kafka). Re-exported by ``streams``.

    from streams import read_predictions
    df = read_predictions()   # the broker of the settings (VISIONSTREAM_CONFIG, the environment)

The latest event per URI, as ``visionstream evaluate`` keeps them (a replay or a retry makes
duplicates); a dead letter is a row with ``error_stage`` set. Reads from the topics' start up to
their end offsets when reading began (``kafka.read_topics``), on an event loop of its own in
a thread, so it works inside Jupyter's running loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.client.notebook import COLUMNS, to_frame
from inference.records.results import is_dead_letter, is_prediction
from inference.settings import load_settings
from streams.service.events import parse_time
from streams.service.kafka import read_topics

if TYPE_CHECKING:
    import pandas


# ``inference.COLUMNS`` and what only an event knows
EVENT_COLUMNS: dict[str, str] = {
    **COLUMNS,
    "etag": "string",
    "version": "string",
    "event_time": "string",  # the upload's, from its S3 event (ISO 8601)
    "published_at": "string",  # when the prediction or dead letter was published
    "latency_ms": "Float64",  # upload (a replay: its announcement) to publish
    "backfill": "boolean",
}


def event_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """One prediction or dead-letter event, flat (``EVENT_COLUMNS``). Pure."""
    prediction = event.get("prediction") or {}
    truth = event.get("ground_truth") or {}
    timings = event.get("timings") or {}
    model = event.get("model") or {}
    dead = is_dead_letter(event)
    return {
        "uri": event.get("uri"),
        "name": event.get("name") or str(event.get("uri", "")).rsplit("/", 1)[-1],
        "label": prediction.get("label"),
        "wnid": prediction.get("wnid"),
        "class_index": prediction.get("class_index"),
        "score": prediction.get("score"),
        "top_k": list(event.get("top_k") or []),
        "truth_wnid": truth.get("wnid"),
        "truth_label": truth.get("label"),
        "match": event.get("match"),
        "error_stage": event.get("stage") if dead else None,
        "error_message": event.get("reason") if dead else None,
        "fetch_ms": timings.get("fetch_ms"),
        "decode_ms": timings.get("decode_ms"),
        "queue_ms": timings.get("queue_ms"),
        "inference_ms": timings.get("inference_ms"),
        "batch_size": timings.get("batch_size"),
        "model": model.get("name"),
        "weights": model.get("weights"),
        "precision": model.get("precision"),
        "device": model.get("device"),
        "model_version": model.get("version"),
        "worker": event.get("worker"),
        "etag": event.get("etag"),
        "version": event.get("version"),
        "event_time": event.get("event_time"),
        "published_at": event.get("failed_at") if dead else event.get("predicted_at"),
        "latency_ms": event.get("latency_ms"),
        "backfill": event.get("backfill"),
    }


def read_predictions(
    bootstrap_servers: str | None = None,
    *,
    topic: str | None = None,
    dead_letters: bool = True,
    since: datetime | str | None = None,
    limit: int | None = None,
    idle_s: float = 5.0,
    config: str | Path | None = None,
) -> pandas.DataFrame:
    """The predictions topic (``topic``, default ``topics.predictions``), with the dead-letter
    topic unless ``dead_letters`` is False, as one row per URI (``EVENT_COLUMNS``): its latest
    event. ``since``: only events published at or after it (a datetime, or ISO 8601; no zone
    means UTC). ``limit``: read at most this many events. Settings (the broker, security, topic
    names) are found as the commands find them: the file ``VISIONSTREAM_CONFIG`` names,
    ``config`` on top (as ``--config``), the environment; ``bootstrap_servers`` wins where given."""
    import pandas  # noqa: F401 - missing pandas fails here, before the topics are read

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: a whole number of events, 1 or more (got {limit!r})")
    if not idle_s > 0:
        raise ValueError(f"idle_s: seconds, above 0 (got {idle_s!r})")
    after = _moment(since)
    settings = load_settings(config, config_env=True)
    if bootstrap_servers:
        settings = settings.with_overrides({"kafka": {"bootstrap_servers": bootstrap_servers}})
    topics = [topic or settings.topics.predictions, *([settings.topics.dead_letter] if dead_letters else [])]
    latest: dict[str, dict[str, Any]] = {}
    read = 0

    def take(_: str, records: list[Any]) -> None:
        nonlocal read
        for value in (record.value for record in records):
            if limit is not None and read >= limit:
                return
            read += 1
            event = _event(value)
            if event is not None and (after is None or _published(event) is None or _published(event) >= after):  # type: ignore[operator]
                latest[event["uri"]] = event

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="visionstream-read") as thread:
        thread.submit(asyncio.run, read_topics(settings.kafka, topics, idle_s, take)).result()
    return to_frame((event_row(event) for event in latest.values()), EVENT_COLUMNS)


def _event(value: bytes | None) -> dict[str, Any] | None:
    """A prediction or dead-letter event that names an image; None for anything else."""
    try:
        event = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("uri"), str) or not event["uri"]:
        return None
    return event if is_prediction(event) or is_dead_letter(event) else None


def _published(event: Mapping[str, Any]) -> datetime | None:
    return parse_time(event.get("predicted_at") or event.get("failed_at"))


def _moment(since: datetime | str | None) -> datetime | None:
    if since is None:
        return None
    if isinstance(since, str):
        moment = parse_time(since)
        if moment is None:
            raise ValueError(f"since: an ISO 8601 time or a datetime (got {since!r})")
        return moment
    if isinstance(since, datetime):
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    raise ValueError(f"since: an ISO 8601 time or a datetime (got {since!r})")
