"""Real services for the integration tests, started once per session on loopback.

- Kafka: the embedded tansu broker, or any Kafka named by KAFKA_BOOTSTRAP_SERVERS.
- S3: moto's server, or any S3-compatible endpoint named by VISIONSTREAM_TEST_S3_ENDPOINT
  (credentials from the standard AWS variables).
- Dask: visionstream's embedded cluster on the CPU (one worker, two threads), shared by every test.
Each test gets topics of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from inference.client.embedded import embedded_cluster, reaching
from inference.settings import ClusterSettings, Settings
from streams.embedded.stack import EMBEDDED_BROKER_KAFKA, S3_TEST_CREDENTIALS, EmbeddedStack, free_port, start_stream_worker
from streams.service.kafka import ensure_topics, start_consumer

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Services:
    bootstrap_servers: str
    s3_endpoint: str
    kafka_timeouts: dict[str, float]


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    endpoint = os.environ.get("VISIONSTREAM_TEST_S3_ENDPOINT")
    stack = EmbeddedStack(log_dir=tmp_path_factory.mktemp("stack-logs"))
    stack.start(broker=bootstrap is None, s3=endpoint is None)
    if endpoint is None:
        # the embedded S3 server's credentials as a user's shell would hold them (AWS_*): the
        # path the Dask workers, the CLI and the stream workers spawned here take, and what
        # the tests mean to exercise (the plugin carries no credentials; each process reads its own)
        os.environ.update(S3_TEST_CREDENTIALS)
    try:
        yield Services(
            bootstrap_servers=bootstrap or stack.bootstrap_servers,
            s3_endpoint=endpoint or stack.s3_endpoint,
            kafka_timeouts=EMBEDDED_BROKER_KAFKA if bootstrap is None
            else {"session_timeout_s": 10.0, "heartbeat_interval_s": 1.0},
        )
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def dask_cluster(services: Services) -> Iterator[Any]:
    """visionstream's own embedded cluster, on the CPU, with its default mutual TLS."""
    cluster = embedded_cluster(ClusterSettings(gpu=False))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def dask_scheduler(dask_cluster: Any) -> str:
    return dask_cluster.scheduler_address


@pytest.fixture(scope="session")
def dask_reach(dask_cluster: Any) -> dict[str, Any]:
    """``cluster`` settings that reach the session's cluster: its address, certificate and key."""
    return reaching(dask_cluster)


def plain_scheduler(address: str) -> dict[str, Any]:
    """``cluster`` settings for a standalone scheduler over plain TCP (a test's own), replacing
    the session cluster's TLS material."""
    return {"scheduler": address, "tls_ca": None, "tls_cert": None, "tls_key": None}


@pytest.fixture(scope="session")
def dask_env(dask_reach: dict[str, Any]) -> dict[str, str]:
    """The same for a `visionstream` subprocess given ``--scheduler``: through its environment."""
    return {f"VISIONSTREAM_CLUSTER__{key.upper()}": value for key, value in dask_reach.items() if key.startswith("tls_")}


@pytest.fixture
def settings(services: Services, dask_reach: dict[str, Any], tmp_path: Path) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return Settings().with_overrides(
        {
            "model": {"name": "resnet18", "weights": "none", "precision": "fp32"},  # compile: the default (auto)
            "kafka": {"bootstrap_servers": services.bootstrap_servers, "consumer_group": f"vs-test-{suffix}", **services.kafka_timeouts},
            "topics": {
                "uploads": f"uploads-{suffix}",
                "backfill": f"backfill-{suffix}",
                "predictions": f"predictions-{suffix}",
                "dead_letter": f"dlq-{suffix}",
                "models": f"models-{suffix}",
                "review": f"review-{suffix}",
            },
            "storage": {"endpoint_url": services.s3_endpoint, "region": "us-east-1", "bucket": f"bucket-{suffix}"},
            "cluster": dask_reach,
            "batch": {"linger_s": 0.5, "retry_timeout_s": 60},
            "worker": {"web_port": free_port(), "data_dir": str(tmp_path / "worker-data"), "shutdown_grace_s": 5},
        }
    )


@pytest.fixture
def bucket(settings: Settings) -> str:
    boto3.client("s3", **settings.storage.boto3_kwargs()).create_bucket(Bucket=settings.storage.bucket)
    return settings.storage.bucket


def write_config(settings: Settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


def visionstream(*args: str, timeout_s: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams", *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=os.environ | (env or {}),
    )


class StreamWorker:
    """`visionstream worker` in its own process, as in production."""

    def __init__(self, settings: Settings, workdir: Path, name: str = "worker", env: dict[str, str] | None = None) -> None:
        self.settings, self.workdir, self.name, self.env = settings, workdir, name, env
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker.web_port}/health"

    def start(self) -> StreamWorker:
        """Start (or start again, after a kill): the way the demo and the benchmark start theirs."""
        self.process = start_stream_worker(self.settings, self.workdir, self.name, "INFO", env=self.env)
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.url, timeout=1) as response:
                return json.load(response)
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            health = self.health()
            if health and health["status"] == "ready":
                return health
            time.sleep(0.3)
        raise AssertionError(f"worker not ready in {timeout_s} s\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    workers: list[StreamWorker] = []

    def start(settings: Settings, name: str = "worker", env: dict[str, str] | None = None) -> StreamWorker:
        worker = StreamWorker(settings, tmp_path, name, env).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def create_topics(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings.kafka, settings.topics))


def collect_events(settings: Settings, expected_uris: set[str], timeout_s: float = 180, topics: tuple[str, ...] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every event for ``expected_uris`` (all of them, duplicates included) on the output topics."""

    async def run() -> dict[str, list[dict[str, Any]]]:
        names = topics or (settings.topics.predictions, settings.topics.dead_letter)
        consumer = await start_consumer(settings.kafka, *names, from_beginning=True)
        found: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while not expected_uris <= found.keys() and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        event = json.loads(record.value)
                        found.setdefault(event.get("uri") or f"message:{record.offset}", []).append(event)
        finally:
            await consumer.stop()
        return found

    return asyncio.run(run())


def drain_topic(settings, topic: str, idle_s: float = 3.0) -> list[dict[str, Any]]:
    """Every event on ``topic``, read until it stays quiet for ``idle_s`` (late duplicates included)."""

    async def run() -> list[dict[str, Any]]:
        consumer = await start_consumer(settings.kafka, topic, from_beginning=True)
        events: list[dict[str, Any]] = []
        try:
            while batch := await consumer.getmany(timeout_ms=int(idle_s * 1000)):
                events.extend(json.loads(record.value) for records in batch.values() for record in records)
        finally:
            await consumer.stop()
        return events

    return asyncio.run(run())


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, log: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log()}")
