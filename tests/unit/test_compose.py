"""docker-compose.yml: valid for docker-compose, and consistent with the settings it feeds."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from inference.settings import load_settings
from streams.kafka import all_topics

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose client not installed (.ci/run installs it)")
def test_docker_compose_accepts_the_file():
    done = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_services_are_all_there():
    assert {"kafka", "kafka-init", "minio", "minio-init", "dask-scheduler", "dask-worker", "dask-worker-cpu", "visionstream"} <= SERVICES.keys()
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_gpu_workers_reserve_nvidia_devices_and_a_cpu_profile_exists():
    [device] = SERVICES["dask-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert SERVICES["dask-worker"]["profiles"] == ["gpu"] and SERVICES["dask-worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in SERVICES["dask-worker-cpu"]


def test_long_running_services_have_healthchecks_and_start_in_order():
    for name in ("kafka", "minio", "dask-scheduler", "visionstream"):
        assert "test" in SERVICES[name]["healthcheck"], name
    depends = SERVICES["visionstream"]["depends_on"]
    assert depends["kafka-init"]["condition"] == "service_completed_successfully"
    assert depends["dask-scheduler"]["condition"] == "service_healthy"


def test_minio_notifies_the_uploads_topic_and_init_creates_every_topic():
    settings = load_settings(REPO / "configs" / "compose.yaml", environ={})
    minio = SERVICES["minio"]["environment"]
    assert minio["MINIO_NOTIFY_KAFKA_TOPIC_PRIMARY"] == settings.topics.uploads
    assert minio["MINIO_NOTIFY_KAFKA_BROKERS_PRIMARY"] == settings.kafka.bootstrap_servers
    script = SERVICES["kafka-init"]["command"][0]
    created = re.search(r"for topic in ([^;]+);", script).group(1).split()
    assert sorted(created) == sorted(all_topics(settings.topics))
    assert f"--partitions {settings.topics.partitions}" in script


def test_every_setting_the_compose_file_passes_exists():
    env: dict[str, str] = {}
    for service in SERVICES.values():
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("VISIONSTREAM_")})
    assert env, "the compose file sets no VISIONSTREAM_ variables?"
    resolved = {k: re.sub(r"\$\{[^:}]+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
    settings = load_settings(REPO / "configs" / "compose.yaml", environ=resolved)  # unknown keys raise ConfigError
    assert settings.cluster.scheduler == "tcp://dask-scheduler:8786"
    assert settings.storage.endpoint_url == "http://minio:9000" and settings.storage.secret_access_key is None
