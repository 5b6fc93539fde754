"""The compose profile `monitoring`: Prometheus scrapes what the stack exports, Grafana shows it,
and the dashboard asks only for metrics the stream worker exports."""

import json
import re
from pathlib import Path

import yaml

from inference.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
SERVICES = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
PROMETHEUS = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "visionstream.json").read_text())

from streams.service.metrics import METRIC_NAMES  # the one list of what the stream worker exports


def exported_series(names) -> set[str]:
    """The series names Prometheus sees for these metric names: a counter `x_total` (or `x`, as
    prometheus_client registers it) as x_total; a histogram `x` as x_bucket, x_sum, x_count."""
    series = set()
    for name in names:
        if name.endswith("_total"):
            series |= {name, name.removesuffix("_total") + "_created"}
        else:
            series |= {name, *(name + suffix for suffix in ("_total", "_created", "_bucket", "_sum", "_count", "_info"))}
    return series


def expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]


def scrape_targets() -> dict[str, set[str]]:
    """job -> host:port, from static targets and DNS discovery alike."""
    jobs: dict[str, set[str]] = {}
    for job in PROMETHEUS["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{dns['port']}" for name in dns["names"]}
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
    return jobs


def option(service: str, flag: str) -> str:
    command = SERVICES[service]["command"]
    return command[command.index(flag) + 1]


def test_the_monitoring_profile_holds_prometheus_and_grafana_and_nothing_else_needs_it():
    assert SERVICES["prometheus"]["profiles"] == ["monitoring"]
    assert SERVICES["grafana"]["profiles"] == ["monitoring"]
    assert SERVICES["dcgm-exporter"]["profiles"] == ["monitoring-gpu"]
    for name, service in SERVICES.items():
        if "monitoring" not in (service.get("profiles") or []):
            assert not {"prometheus", "grafana"} & set(service.get("depends_on") or {}), name


def test_prometheus_scrapes_the_stream_worker_the_scheduler_and_the_workers_where_they_listen():
    settings = load_settings(REPO / "configs" / "compose.yaml", environ={})
    scheduler_port = option("dask-scheduler", "--dashboard-address").rsplit(":", 1)[1]
    worker_ports = {option(name, "--dashboard-address").rsplit(":", 1)[1] for name in ("dask-worker", "dask-worker-cpu")}
    [worker_port] = worker_ports  # one fixed port, scraped on every worker container
    jobs = scrape_targets()
    assert jobs["visionstream"] == {f"visionstream:{settings.worker.web_port}"}
    assert settings.worker.web_host == "0.0.0.0"  # reachable from Prometheus' container
    assert jobs["dask-scheduler"] == {f"dask-scheduler:{scheduler_port}"}
    assert jobs["dask-workers"] == {f"dask-worker:{worker_port}", f"dask-worker-cpu:{worker_port}"}
    assert jobs["dcgm"] == {"dcgm-exporter:9400"}


def test_prometheus_and_grafana_read_their_files_from_the_repository():
    mounts = {name: [volume.split(":") for volume in SERVICES[name]["volumes"]] for name in ("prometheus", "grafana")}
    for name, volumes in mounts.items():
        for source, *_ in volumes:
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
    assert ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/visionstream.yml").read_text())["providers"][0]
    dashboards = {target for source, target, *_ in mounts["grafana"] if source == "./deploy/grafana/dashboards"}
    assert dashboards == {provider["options"]["path"]}


def test_grafana_reaches_prometheus_only_needs_a_password_and_opens_the_dashboard():
    [datasource] = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert SERVICES["grafana"]["networks"] == ["monitoring"]
    assert "monitoring" in SERVICES["prometheus"]["networks"] and "default" in SERVICES["prometheus"]["networks"]
    env = SERVICES["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].endswith("/visionstream.json")
    uids = {panel["datasource"]["uid"] for panel in DASHBOARD["panels"]}
    uids |= {target["datasource"]["uid"] for panel in DASHBOARD["panels"] for target in panel["targets"]}
    assert uids == {datasource["uid"]}


def test_the_dashboard_asks_only_for_metrics_the_stream_worker_exports():
    known = exported_series(METRIC_NAMES)
    used = {name for expr in expressions() for name in re.findall(r"\bvisionstream_[a-z0-9_]+", expr)}
    assert used, "the dashboard shows no visionstream metric"
    assert not used - known, f"not exported by the stream worker: {sorted(used - known)}"


def test_the_dashboard_shows_what_operators_asked_for():
    exprs = "\n".join(expressions())
    assert "rate(visionstream_images_predicted_total" in exprs  # throughput
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(visionstream_end_to_end_latency_seconds_bucket" in exprs
    assert re.search(r"by \(topic, partition\) \(visionstream_consumer_lag_messages\)", exprs)
    assert re.search(r"sum by \(stage\) \(rate\(visionstream_dead_letters_total", exprs)
    assert "visionstream_batch_duration_seconds_bucket" in exprs
    assert "visionstream_in_flight_batches" in exprs
    assert "DCGM_FI_DEV_GPU_UTIL" in exprs and "dask_worker_memory_bytes" in exprs  # GPU; Dask exports none itself


def test_every_panel_has_a_unique_id_a_place_and_a_query():
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
