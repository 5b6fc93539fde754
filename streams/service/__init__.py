"""The running service and its operations against real Kafka and S3: the Faust app and the
classify agent, batch processing and acks, the wire events, S3 notifications, topics, metrics,
logs, the worker process, and the ``upload`` and ``backfill`` producers. Imports ``inference``
and ``streams.errors``; never ``streams.cli`` or ``streams.embedded``."""
