"""Tooling, not for production: the embedded stack (a Kafka-protocol broker, moto's S3 server,
Dask scheduler / worker and stream-worker processes on loopback), `visionstream demo`, and
generated sample images. Used by the demo, the benchmarks and the tests alike; needs the
``embedded`` extra. Imports ``streams.service`` and ``inference``; never ``streams.cli``."""
