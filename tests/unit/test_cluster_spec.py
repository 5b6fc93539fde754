"""The embedded cluster's shape (``inference.client.embedded.worker_specs``): pure, no cluster started."""

import pytest

from inference.client.embedded import worker_processes, worker_specs
from inference.settings import ClusterSettings


def test_a_cpu_host_gets_one_worker_listening_on_loopback():
    specs = worker_specs(ClusterSettings(), [], cores=2, env={"AWS_ACCESS_KEY_ID": "x"})
    [(name, spec)] = specs.items()
    assert name == "cpu-0"
    assert spec["options"]["host"] == "127.0.0.1" and spec["options"]["nthreads"] == 2
    assert "CUDA_VISIBLE_DEVICES" not in spec["options"]["env"]
    assert spec["options"]["env"]["AWS_ACCESS_KEY_ID"] == "x"  # what the caller passes reaches the worker


@pytest.mark.parametrize(("gpus", "cores", "expected"), [(1, 16, 4), (1, 8, 2), (1, 2, 1), (2, 16, 4), (8, 64, 16), (4, 8, 4)])
def test_a_gpu_host_gets_several_workers_per_gpu_where_the_cores_allow(gpus, cores, expected):
    assert worker_processes(ClusterSettings(), gpus, cores) == expected


def test_n_workers_wins_over_the_default():
    assert worker_processes(ClusterSettings(n_workers=3), 1, 64) == 3
    assert worker_processes(ClusterSettings(n_workers=3), 0, 64) == 3


def test_each_worker_sees_one_gpu_round_robin_by_its_visible_name():
    specs = worker_specs(ClusterSettings(threads_per_worker=3), ["2", "5"], cores=16, env={})
    seen = {name: spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] for name, spec in specs.items()}
    assert seen == {"gpu2-0": "2", "gpu5-0": "5", "gpu2-1": "2", "gpu5-1": "5"}
    assert all(spec["options"]["nthreads"] == 3 for spec in specs.values())
    assert all(spec["options"]["env"]["VISIONSTREAM_LOCAL_WORKERS"] == "4" for spec in specs.values())


@pytest.mark.parametrize(("configured", "threads", "expected"), [(0, 8, 9), (0, 2, 3), (0, 0, 2), (3, 8, 3), (1, 8, 1)])
def test_batches_in_flight_default_to_one_per_task_thread_and_one_more(configured, threads, expected):
    from inference.client.job import batches_in_flight

    assert batches_in_flight(configured, threads) == expected


def test_tls_to_a_standing_scheduler_needs_all_three_and_a_tls_address_needs_them():
    import pytest
    from pydantic import SecretStr

    from inference.client.connection import client_security
    from inference.errors import ConfigError
    from inference.settings import ClusterSettings

    assert client_security(ClusterSettings(scheduler="tcp://dask:8786")) is None
    with pytest.raises(ConfigError, match="tls_ca, tls_cert and tls_key"):
        client_security(ClusterSettings(scheduler="tls://dask:8786"))
    with pytest.raises(ConfigError, match="missing cluster.tls_key"):
        client_security(ClusterSettings(scheduler="tls://dask:8786", tls_ca="/ca.pem", tls_cert="/me.pem"))
    security = client_security(ClusterSettings(scheduler="tls://dask:8786", tls_ca="/ca.pem", tls_cert="/me.pem", tls_key=SecretStr("/me.key")))
    assert security.require_encryption and security.tls_client_key == "/me.key"
    assert "me.key" not in repr(ClusterSettings(tls_key=SecretStr("/me.key")))


def test_only_an_idle_plugin_of_the_same_line_or_a_legacy_one_is_superseded():
    """Retirement follows lineage, never idleness alone: two configurations sharing a cluster, a
    notebook's client and the newer version during a rolling update keep their models."""
    from inference.client.retirement import superseded

    usage = {
        "tcp://w1": {"own": (1, 0.0, "stream:a"), "old-a": (0, 500.0, "stream:a"), "busy-a": (0, 5.0, "stream:a"),
                     "peer-b": (0, 500.0, "stream:b"), "notebook": (0, 500.0, None), "legacy": (0, 500.0)},
        "tcp://w2": {"old-a": (0, 400.0, "stream:a"), "busy-a": (1, 0.0, "stream:a")},
    }
    assert superseded(usage, "own", "stream:a", idle_s=120) == ["legacy", "old-a"]
    assert superseded(usage, "peer-b", "stream:b", idle_s=120) == ["legacy"]
    assert superseded(usage, "notebook", None, idle_s=120) == []  # a client without a line retires nothing
