"""Errors of the stream side.

    StreamError
     ├── MalformedEvent      an input message that is not an S3 notification we can read;
     │                       becomes a dead-letter event, never a crash
     ├── BrokerUnavailable   Kafka could not be reached or a topic could not be created
     ├── BatchRetryExhausted a batch kept failing for batch.retry_timeout_s; the worker stops
     ├── UploadFailed        `visionstream upload` could not store a file (no bucket, no access, no store)
     └── EmbeddedStackError  the embedded broker / S3 server (demo, tests) did not start
"""

from __future__ import annotations

from inference.records.report import plural


class StreamError(Exception):
    """Base of every error raised by the streams package."""


class MalformedEvent(StreamError):
    """An input message that cannot be read as an S3 event notification."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerUnavailable(StreamError):
    """Kafka could not be reached, or a topic could not be created."""

    def __init__(self, servers: str, reason: str) -> None:
        super().__init__(f"Kafka at {servers} unavailable: {reason}")
        self.servers, self.reason = servers, reason


class BatchRetryExhausted(StreamError):
    """A batch kept failing (cluster, storage, model) for longer than ``batch.retry_timeout_s``."""

    def __init__(self, images: int, retry_timeout_s: float, last_error: str) -> None:
        super().__init__(f"batch of {plural(images, 'image')} failed for {retry_timeout_s:g} s (batch.retry_timeout_s); last error: {last_error}")
        self.images, self.retry_timeout_s, self.last_error = images, retry_timeout_s, last_error


class UploadFailed(StreamError):
    """``visionstream upload`` could not put a file into the bucket."""


class EmbeddedStackError(StreamError):
    """A server of the embedded stack (broker, S3) did not start."""
