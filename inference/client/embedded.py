"""The Dask cluster visionstream starts itself when no scheduler is given (``cluster.scheduler``
unset): the commands, the demo, the benchmarks and the tests use it. Everything listens on
127.0.0.1; with ``cluster.tls`` its transport is mutual TLS with a certificate of its own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from distributed import Nanny, Scheduler, SpecCluster
from distributed.security import Security
from distributed.system import MEMORY_LIMIT

from inference.errors import ClusterUnavailable
from inference.settings import ClusterSettings
from inference.worker.plugin import EMBEDDED_ENV, STDOUT_TO_STDERR_ENV

log = logging.getLogger(__name__)


def embedded_cluster(settings: ClusterSettings, *, asynchronous: bool = False, env: Mapping[str, str] | None = None) -> SpecCluster:
    """The cluster visionstream starts when no scheduler is given; demo, benchmarks and tests use it too.

    Everything listens on 127.0.0.1. On a host with CUDA devices (``cluster.gpu`` auto or true)
    each worker process sees one GPU (``CUDA_VISIBLE_DEVICES``), several workers per GPU where
    the cores allow (``worker_processes``): a worker's fetch, header reads and launches hold its
    GIL, so one process cannot keep a GPU busy. Elsewhere ``cluster.n_workers`` CPU workers
    (default 1). ``env`` reaches every worker process (credentials of an embedded S3 server).
    Await it when ``asynchronous``; close it (or use it as a context manager) when done.
    """
    gpus = _visible_gpus() if settings.gpu is not False else []
    if settings.gpu is True and not gpus:
        raise ClusterUnavailable("embedded", "cluster.gpu is true but no CUDA device is visible")
    # Mutual TLS with a certificate made for this cluster alone (``cluster.tls``): loopback is
    # shared by every local user, and Dask's transport runs whatever a peer sends (pickles).
    security = Security.temporary() if settings.tls else None
    transport = {"security": security, "protocol": "tls://"} if security is not None else {}
    workers = worker_specs(settings, gpus, os.cpu_count() or 1, env or {})
    for spec in workers.values():
        spec["options"].update(transport)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", **transport}}
    _workers_skip_main()
    return EmbeddedCluster(
        workers=workers, scheduler=scheduler, asynchronous=asynchronous, silence_logs=logging.WARNING,
        name="visionstream-embedded", security=security,
    )


_OPEN_EMBEDDED: set[int] = set()  # ids of the embedded clusters open in this process


class EmbeddedCluster(SpecCluster):
    """visionstream's embedded cluster: while one is open, Dask worker processes started in this
    process are prepared without the caller's ``__main__`` (``_workers_skip_main``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _OPEN_EMBEDDED.add(id(self))
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            _OPEN_EMBEDDED.discard(id(self))
            raise

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            _OPEN_EMBEDDED.discard(id(self))


def _workers_skip_main() -> None:
    """Dask worker processes started from here do not run the caller's ``__main__`` again.

    multiprocessing's spawn (Dask's default) re-imports the parent's main module in each child:
    a script that calls ``inference.classify`` at top level, with no ``if __name__ ==
    "__main__":`` guard, would start a cluster again inside each worker process as it boots, which
    multiprocessing refuses, and the caller would wait forever for workers that never come. The
    workers need nothing from the script: they run visionstream's own functions (cloudpickle
    sends anything defined in ``__main__`` by value). So while an embedded cluster is open, the
    preparation of processes Dask's nannies name "Dask Worker process" leaves the main module
    out; every other process, and every process once none is open, is prepared as before."""
    import multiprocessing.spawn as spawn

    original = spawn.get_preparation_data
    if getattr(original, "skips_main_for_dask_workers", False):
        return

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if _OPEN_EMBEDDED and str(name).startswith("Dask Worker process"):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.skips_main_for_dask_workers = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def reaching(cluster: SpecCluster) -> dict[str, Any]:
    """``cluster`` settings with which another process reaches this embedded cluster: its
    address and, where it runs TLS, its certificate and key (the key is a secret: it travels
    through the child's environment, ``Settings.secrets_env``)."""
    security = cluster.security
    settings: dict[str, Any] = {"scheduler": cluster.scheduler_address}
    if security is not None and security.require_encryption:
        settings |= {"tls_ca": security.tls_ca_file, "tls_cert": security.tls_client_cert, "tls_key": security.tls_client_key}
    return settings


def worker_specs(settings: ClusterSettings, gpus: list[str], cores: int, env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """SpecCluster's worker specifications: ``worker_processes`` nannies on 127.0.0.1, spread
    over ``gpus`` (CUDA_VISIBLE_DEVICES names, each worker sees one) round-robin. Pure."""
    count = worker_processes(settings, len(gpus), cores)
    workers: dict[str, dict[str, Any]] = {}
    for index in range(count):
        # the client's stdout may carry its records (`classify -o -`): the workers print to stderr
        worker_env = {**env, "VISIONSTREAM_LOCAL_WORKERS": str(count), STDOUT_TO_STDERR_ENV: "1", EMBEDDED_ENV: "1"}
        name = f"cpu-{index}"
        if gpus:
            gpu = gpus[index % len(gpus)]
            worker_env["CUDA_VISIBLE_DEVICES"] = gpu
            name = f"gpu{gpu}-{index // len(gpus)}"
        workers[name] = {
            "cls": Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": settings.threads_per_worker,
                # a share of the host, but never under 8 GiB where the host has it: a CUDA torch
                # process alone takes several, and Dask pauses a worker at 80 % of its limit
                "memory_limit": max(MEMORY_LIMIT // count, min(MEMORY_LIMIT, 8 << 30)),
                "env": worker_env,
                "silence_logs": logging.WARNING,
            },
        }
    return workers


def worker_processes(settings: ClusterSettings, gpus: int, cores: int) -> int:
    """``cluster.n_workers``, or by default: on a GPU host as many per GPU as there are four
    cores for each (at most 4: two task threads, fetch and decode threads each), else one."""
    if settings.n_workers:
        return settings.n_workers
    if not gpus:
        return 1
    return gpus * max(1, min(4, cores // (4 * gpus)))


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them for a child.
    A Linux host without NVIDIA's driver has none, which is known without importing torch
    (hundreds of MB and seconds, in a process that never runs the model)."""
    if sys.platform.startswith("linux") and not os.path.isdir("/proc/driver/nvidia") and not os.path.exists("/dev/dxg"):  # dxg: WSL2's GPU
        return []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU cluster
        return []
    named = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return named[:count] if len(named) >= count else [str(index) for index in range(count)]
