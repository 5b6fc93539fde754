"""`make bench`: the tutorial's method, `visionstream classify`, the stream path and the ceiling,
on the same images and the same hardware, in one run.

    python -m benchmarks.run [--images N] [--runs R] [--device cpu|cuda] [--source DIR] ...

Every method gets one untimed warm-up batch first, then R timed runs over all the images;
each figure is the median of the R runs, with their min and max. The ceiling (the model alone)
is measured R times before the methods and R times after, and is the median of all 2R. The tutorial's method runs on
a Dask cluster shaped like the tutorial's (one worker per GPU, or one on a CPU machine, with all
the host's cores as threads, and OpenMP given those cores); visionstream on the cluster its
embedded default starts (``inference.client.embedded.embedded_cluster``: on a GPU host up to 4 worker
processes per GPU, ``cluster.threads_per_worker`` task threads each).

Writes benchmarks/results/<cpu|cuda>.{md,json} (one table per device, labelled with its
machine), latest.md (every device's table found there) and stage_breakdown.png, and prints
the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.machine import cpu_name
from inference.worker.cpu import cpu_field
from inference.client.cluster import InferenceCluster
from inference.client.embedded import embedded_cluster, reaching
from inference.worker.compiled import compiled_model, compiled_shapes, compiles
from inference.records.evaluation import percentile
from inference.worker.images import decode_crop
from inference.client.job import batches_in_flight, classify_all
from inference.worker.model import GraphedModel, load_model, resolve_device, resolve_precision
from inference.records.results import ImageResult, is_prediction
from inference.settings import ClusterSettings, Settings
from inference.client.sources import iter_sources
from streams.embedded.stack import S3_TEST_CREDENTIALS

RESULTS = Path(__file__).resolve().parent / "results"
WORKER_ENV = {"DASK_LOGGING__DISTRIBUTED": "error"}  # the workers' own log lines: errors only
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="generated images (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method; figures are their median (default 3)")
    parser.add_argument("--source", help="a folder of real images instead (Stanford Dogs layout)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--decode", choices=["auto", "cpu", "gpu"], default=None, help="images.decode for visionstream (default: the setting's)")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="visionstream's cluster (default: cluster.threads_per_worker)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto", help="model.compile for visionstream (default auto: compiled on the CPU)")
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--paced-s", type=float, default=40.0, help="how long the stream path's paced (latency) phase lasts (default 40)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    # a time limit's SIGTERM unwinds like an error, so the clusters, the stream worker and the
    # embedded servers are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory(prefix="visionstream-bench-") as scratch:
        work = Path(scratch)
        folder = Path(args.source) if args.source else work / "images"
        if not args.source:
            from benchmarks.images import generate

            say(f"generating {args.images} Stanford-Dogs-like images (200-800 px, JPEG q90) ...")
            generate(folder, args.images)
        paths = sorted(str(p) for p in iter_sources([str(folder)], Settings().storage))
        checkpoint = work / "resnet50.pt"
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50().state_dict(), checkpoint)  # same weights for every method
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        overrides: dict[str, Any] = {
            "model": {"weights": str(checkpoint), "device": str(device), "precision": precision, "compile": args.compile},
            "batch": {"size": args.batch_size},
        }
        if args.decode:
            overrides["images"] = {"decode": args.decode}
        if args.threads_per_worker:
            overrides["cluster"] = {"threads_per_worker": args.threads_per_worker}
        settings = Settings().with_overrides(overrides)
        results: dict[str, Any] = {
            "machine": machine(device, precision),
            "images": len(paths),
            "batch_size": args.batch_size,
            "runs": args.runs,
            "visionstream": {"threads_per_worker": settings.cluster.threads_per_worker, "decode": settings.images.decode, "compile": args.compile},
        }

        output = Path(args.output)
        say("measuring the ceiling: the model alone on pre-decoded uint8 crops, and decode alone ...")
        results["ceiling"] = before = ceiling(settings, paths, args.runs)
        keep(results, output)
        if not args.skip_tutorial:
            say("running the tutorial's method (dask.delayed, model rebuilt per batch, pickles) on a tutorial-shaped cluster ...")
            results["tutorial"] = tutorial_runs(device, paths, checkpoint, work, args.runs, args.batch_size)
            keep(results, output)
        # what `visionstream classify` starts; its workers read the embedded S3 server with its credentials
        with embedded_cluster(settings.cluster, env=WORKER_ENV | S3_TEST_CREDENTIALS) as cluster:
            settings = settings.with_overrides({"cluster": reaching(cluster)})
            say("running visionstream classify ...")
            results["classify"], records = asyncio.run(classify_runs(settings, paths, args.runs))
            say("running visionstream classify again as a user would, from a fresh process (start-up included) ...")
            results["classify"]["from_start"] = classify_from_start(settings, folder, work)
            results["stages"] = {"classify": stage_breakdown(records)}
            keep(results, output)
            if not args.skip_stream:
                say("running the stream path on the embedded broker and S3 server ...")
                results["stream"], results["stages"]["stream"] = stream(settings, folder, work, len(paths), args.runs, args.paced_s)
                keep(results, output)
        say("measuring the ceiling again (a shared machine's load drifts; the figure is the median of both sets of runs) ...")
        results["ceiling"] = merged(before, ceiling(settings, paths, args.runs))
    ratios(results)
    write(results, output)
    return 0


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def machine(device: torch.device, precision: str) -> dict[str, Any]:
    cpu = cpu_name()
    flags = cpu_field("flags")
    vector = "AMX" if "amx_bf16" in flags else "AVX-512 bf16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "vector": vector,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "precision": precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def spread(count: int, seconds: list[float]) -> dict[str, Any]:
    """Images per second over several runs: the median, min and max, and the runs' seconds."""
    rates = sorted(count / s for s in seconds)
    return {"images": count, "runs_s": [round(s, 3) for s in seconds], "images_per_s": statistics.median(rates), "min": rates[0], "max": rates[-1]}


def timed(run: Callable[[], Any], runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds


def ceiling(settings: Settings, paths: list[str], runs: int) -> dict[str, Any]:
    """The model alone (crops already decoded, uint8 on the host, as visionstream hands them
    over; CUDA-graphed too on a GPU) and the CPU decode path alone on one core."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(settings.model)
    spec = model.preprocessing
    sample = [Path(p).read_bytes() for p in paths[: min(len(paths), 120)]]
    torch.set_num_threads(1)
    decode_s = timed(lambda: [decode_crop(data, "x", spec, settings.images.max_pixels, settings.images.draft) for data in sample], runs)
    torch.set_num_threads(os.cpu_count() or 1)
    crops = [decode_crop(data, "x", spec, settings.images.max_pixels) for data in sample]
    size = settings.batch.size
    batch = torch.stack((crops * (size // len(crops) + 1))[:size])
    rounds = 1 if model.device.type == "cpu" else 20
    out: dict[str, Any] = {"decode_one_core": spread(len(sample), decode_s)}
    forwards = {"eager": model.predict}
    if model.device.type == "cuda" and settings.model.compile is not True:
        forwards["cuda_graph"] = GraphedModel.capture(model, size).predict
    if compiles(settings.model.compile, model.device):  # built here, so the workers load it from the cache
        # the workers' thread count (one worker per CPU host here): the same shapes and packages
        shapes = compiled_shapes(size, torch.get_num_threads())
        package = compiled_model(model, shapes, settings.model.compile_cache_dir, settings.model.compile)
        if package is not None:
            forwards["compiled"] = package.predict
    for name, predict in forwards.items():
        predict(batch)  # warm-up
        seconds = timed(lambda predict=predict: [predict(batch) for _ in range(rounds)], runs)
        out[f"model_{name}"] = spread(rounds * size, seconds)
    out["model"] = max((v for k, v in out.items() if k.startswith("model_")), key=lambda v: v["images_per_s"])
    return out


def merged(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two ceiling measurements as one: every figure over the runs of both."""
    out = {key: spread(value["images"], value["runs_s"] + second[key]["runs_s"]) for key, value in first.items() if key != "model" and key in second}
    out["model"] = max((v for k, v in out.items() if k.startswith("model_")), key=lambda v: v["images_per_s"])
    return out


def tutorial_cluster(device: torch.device, workers: int, threads: int) -> Any:
    """The tutorial's cluster shape on the factory visionstream uses: ``workers`` (one per GPU)
    with ``threads`` task threads each, and OpenMP/MKL allowed those threads (Dask's nannies
    would otherwise export OMP_NUM_THREADS=1 and starve torch)."""
    shape = ClusterSettings(n_workers=workers, threads_per_worker=threads, gpu=device.type == "cuda")
    return embedded_cluster(shape, env=WORKER_ENV | {name: str(threads) for name in THREAD_VARIABLES})


def tutorial_runs(device: torch.device, paths: list[str], checkpoint: Path, work: Path, runs: int, batch_size: int) -> dict[str, Any]:
    """The tutorial's cluster: one worker per GPU (one on a CPU machine) with every core of
    the host as threads, and torch allowed those cores."""
    from distributed import Client

    from benchmarks import tutorial

    cores = os.cpu_count() or 1
    workers = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    threads = max(1, cores // workers)
    classes = [f"{i}: {name}" for i, name in enumerate(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])]
    began = time.perf_counter()
    with tutorial_cluster(device, workers, threads) as cluster, Client(cluster) as client:
        out = work / "pickles"
        out.mkdir(exist_ok=True)
        target = "cuda" if device.type == "cuda" else "cpu"
        done: list[int] = [tutorial.run(client, paths, str(checkpoint), classes, str(out), target)]  # the first run warms up
        from_start_s = time.perf_counter() - began  # its cluster's start and the first run: what a user waits for
        seconds = timed(lambda: done.append(tutorial.run(client, paths, str(checkpoint), classes, str(out), target)), runs)
    result = spread(done[-1], seconds)
    result["from_start"] = spread(done[0], [from_start_s])
    result["cluster"] = {"workers": workers, "threads_per_worker": threads, "omp_threads": threads}
    return result


def classify_from_start(settings: Settings, folder: Path, work: Path) -> dict[str, Any]:
    """`visionstream classify FOLDER` as a user runs it, in a fresh process: the embedded
    cluster's start, the model's load (and, compiling, its package's load from the cache the
    ceiling filled), then every image. Images/s over the whole wall-clock time."""
    import subprocess

    model = settings.model
    out = work / "from-start.jsonl"
    command = [
        sys.executable, "-m", "streams", "classify", "--log-level", "WARNING", "--output", str(out), "--weights", model.weights,
        "--precision", model.precision, "--device", model.device, "--batch-size", str(settings.batch.size), str(folder),
    ]
    environment = os.environ | {  # the cluster shape of the runs it is compared with
        "VISIONSTREAM_MODEL__COMPILE": str(model.compile).lower(),
        "VISIONSTREAM_CLUSTER__THREADS_PER_WORKER": str(settings.cluster.threads_per_worker),
        "VISIONSTREAM_IMAGES__DECODE": settings.images.decode,
    }
    if model.compile_cache_dir:
        environment["VISIONSTREAM_MODEL__COMPILE_CACHE_DIR"] = model.compile_cache_dir
    began = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    return spread(sum(1 for _ in out.open()), [seconds])


async def classify_runs(settings: Settings, paths: list[str], runs: int) -> tuple[dict[str, Any], list[ImageResult]]:
    records: list[ImageResult] = []
    seconds: list[float] = []
    async with InferenceCluster.from_settings(settings) as cluster:
        await cluster.classify(paths[: settings.batch.size])  # warm-up, untimed: the model is resident from here on
        await compiled_everywhere(cluster)
        threads = sum((await cluster.threads()).values())
        in_flight = batches_in_flight(settings.batch.max_in_flight, threads)  # what `visionstream classify` uses
        errors = 0
        for run in range(runs):
            kept: list[ImageResult] = []
            tally = await classify_all(cluster, paths, settings.batch.size, in_flight, kept.append)
            seconds.append(tally.elapsed_s)
            errors += tally.errors
            if run == runs - 1:
                records = kept
    result = spread(len(paths), seconds)
    result.update({"errors": errors, "in_flight": in_flight, "task_threads": threads})
    return result, records


async def compiled_everywhere(cluster: InferenceCluster, timeout_s: float = 900) -> None:
    """Wait until no worker's forward pass is still compiling (part of the warm-up: the package is
    loaded from the cache the ceiling filled, or built)."""
    from inference.worker.plugin import model_health

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = await cluster.client.run(model_health, name=cluster.plugin.name)
        if health and all(h.get("forward") not in ("compiling", None) for h in health.values()):
            say(f"forward pass on the workers: {sorted({str(h.get('forward')) for h in health.values()})}")
            return
        await asyncio.sleep(1)
    raise TimeoutError(f"the workers were still compiling after {timeout_s:.0f} s")


def stage_breakdown(records: list[ImageResult]) -> dict[str, float]:
    batches = {(r.worker, r.timings.fetch_ms, r.timings.inference_ms): r.timings for r in records}.values()
    return {
        stage: statistics.mean(getattr(t, f"{stage}_ms") for t in batches) if batches else 0.0
        for stage in ("fetch", "decode", "queue", "inference")
    }


def stream(settings: Settings, folder: Path, work: Path, count: int, runs: int, paced_s: float) -> tuple[dict[str, Any], dict[str, float]]:
    from streams.embedded.demo import collect, stop, wait_ready
    from streams.embedded.stack import EMBEDDED_BROKER_KAFKA, EmbeddedStack, free_port, start_stream_worker
    from streams.service.kafka import ensure_topics
    from streams.service.backfill import BackfillPlan, run_backfill
    from streams.service.events import parse_time
    from streams.service.uploads import create_bucket, upload_paths

    with EmbeddedStack(log_dir=work / "logs") as stack:
        settings = settings.with_overrides({
            "kafka": {"bootstrap_servers": stack.bootstrap_servers, **EMBEDDED_BROKER_KAFKA},
            "storage": stack.storage_settings(),
            "worker": {"web_port": free_port(), "data_dir": str(work / "worker-data")},
            "batch": {"linger_s": 1.0},
        })
        asyncio.run(ensure_topics(settings.kafka, settings.topics))
        create_bucket(settings.storage, settings.storage.bucket)
        worker = start_stream_worker(settings, work / "logs", log_level="WARNING")
        log_path = work / "logs" / "worker.log"
        try:
            wait_ready(settings, worker, log_path, timeout_s=180)
            warm = asyncio.run(paced_uploads(settings, folder, 1e9, settings.batch.size, "warmup/"))  # warm-up batch, untimed
            seen = warm
            rates: list[float] = []
            events: dict[str, Any] = {}
            announcements: dict[int, datetime] = {}
            for run in range(runs):
                # a backlog: the objects are in the bucket first, then their events arrive at once
                # (through backfill's publisher, on the live topic), so the uploads' own PUTs do not
                # share the S3 server with the worker's GETs while it is measured
                asyncio.run(upload_paths([str(folder)], f"saturated{run}/", settings, notify=False))
                announced = announcements[run] = datetime.now(timezone.utc)
                asyncio.run(run_backfill(BackfillPlan(settings.storage.bucket, f"saturated{run}/", settings.topics.uploads), settings))
                seen += count
                events = asyncio.run(collect(settings, seen, 600))
                rates.append(sustained_rate({u: e for u, e in events.items() if f"/saturated{run}/" in u}, announced))
            # the same images from the same S3 server through `classify`: what the storage allows
            same_storage = sorted(uri for uri in events if "/saturated0/" in uri)
            from_s3, _ = asyncio.run(classify_runs(settings, same_storage, runs))
            half = max(1.0, statistics.median(rates) / 2)
            moderate = asyncio.run(paced_uploads(settings, folder, half, min(count, int(half * paced_s) + 1), "paced/"))
            events_moderate = asyncio.run(collect(settings, seen + moderate, 600))
        finally:
            stop(worker)
    paced = [e for uri, e in events_moderate.items() if "/paced/" in uri]
    latencies = sorted(e["latency_ms"] for e in paced if e.get("latency_ms") is not None)
    saturated = [e for uri, e in events.items() if "/saturated" in uri]
    timings = [e["timings"] for e in saturated if e.get("timings")]
    stages = {stage: statistics.mean(t[f"{stage}_ms"] for t in timings) if timings else 0.0 for stage in ("fetch", "decode", "queue", "inference")}
    # a backlog's latency counts from its announcement (the events' own eventTime is the upload)
    total_latency = [
        (parse_time(e["predicted_at"]) - announced).total_seconds() * 1000
        for run, announced in announcements.items()
        for uri, e in events.items() if f"/saturated{run}/" in uri and e.get("predicted_at")
    ]
    stages["wait_and_publish"] = max(0.0, statistics.mean(total_latency) - sum(stages.values())) if total_latency else 0.0
    ordered = sorted(rates)
    return {
        "images": count,
        "images_per_s": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "paced_rate_per_s": half,
        "paced_images": len(paced),
        "latency_ms": {q: percentile(latencies, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "linger_s": settings.batch.linger_s,
        "classify_same_storage": from_s3,
    }, stages


async def paced_uploads(settings: Settings, folder: Path, rate: float, count: int, prefix: str) -> int:
    """Upload ``count`` images at ``rate`` per second, each with its S3 event."""
    from streams.service.uploads import local_files, upload_paths

    files = [str(path) for path, _ in list(local_files([str(folder)], ""))[:count]]
    started = time.perf_counter()
    for index, path in enumerate(files):
        ahead = index / rate - (time.perf_counter() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
        await upload_paths([path], f"{prefix}{index}-", settings, notify=True)
    return len(files)


def sustained_rate(events: dict[str, dict[str, Any]], announced: datetime) -> float:
    """Images per second from the moment their events were announced to the last prediction event."""
    from streams.service.events import parse_time

    predictions = [e for e in events.values() if is_prediction(e)]
    if not predictions:
        return 0.0
    first = announced
    last = max(parse_time(e["predicted_at"]) for e in predictions)
    return len(predictions) / max((last - first).total_seconds(), 1e-6)


def ratios(results: dict[str, Any]) -> None:
    ceiling_rate = results["ceiling"]["model"]["images_per_s"]
    tutorial = results.get("tutorial", {}).get("images_per_s")
    tutorial_from_start = results.get("tutorial", {}).get("from_start", {}).get("images_per_s")
    for method in ("tutorial", "classify", "stream"):
        if method in results:
            results[method]["fraction_of_ceiling"] = results[method]["images_per_s"] / ceiling_rate
            if tutorial:
                results[method]["x_tutorial"] = results[method]["images_per_s"] / tutorial
            from_start = results[method].get("from_start")
            if from_start and tutorial_from_start:
                from_start["x_tutorial"] = from_start["images_per_s"] / tutorial_from_start


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    hardware = f"GPU {m['gpu']}, " if m["gpu"] else "no GPU, "
    vs = results.get("visionstream", {})
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m.get('vector', '?')}), {hardware}torch {m['torch']}; {m['device']} at {m['precision']}; "
        f"{results['images']} images, batch {results['batch_size']}; median of {results.get('runs', 1)} runs after one warm-up batch each "
        f"(min-max in brackets); visionstream: {vs.get('threads_per_worker', '?')} task threads per worker, decode {vs.get('decode', '?')}",
        "",
        "| method | images/s (min-max) | x tutorial | of ceiling | latency p50 / p95 / p99 |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    if "tutorial" in results:
        t = results["tutorial"]
        shape = t.get("cluster", {})
        lines.append(f"| tutorial's method (dask.delayed, model per batch; {shape.get('workers', 1)} worker x {shape.get('threads_per_worker', '?')} threads) | {_rate(t)} | 1.0x | {t['fraction_of_ceiling']:.0%} | |")
    if "from_start" in results.get("tutorial", {}):
        lines.append(f"| tutorial's method including its cluster's start (one run) | {_rate(results['tutorial']['from_start'])} | 1.0x | | |")
    c = results["classify"]
    lines.append(f"| visionstream classify | {_rate(c)} | {_x(c.get('x_tutorial'))} | {c['fraction_of_ceiling']:.0%} | |")
    if "from_start" in c:
        lines.append(f"| visionstream classify from a fresh process, start-up included (one run) | {_rate(c['from_start'])} | {_x(c['from_start'].get('x_tutorial'))} | | |")
    if "stream" in results:
        s = results["stream"]
        lat = s["latency_ms"]
        lat_text = " / ".join("n/a" if lat[q] is None else f"{lat[q]:.0f}" for q in ("p50", "p95", "p99")) + f" ms at {s['paced_rate_per_s']:.1f} img/s"
        lines.append(f"| stream path (saturated; latency paced at half) | {_rate(s)} | {_x(s.get('x_tutorial'))} | {s['fraction_of_ceiling']:.0%} | {lat_text} |")
        if "classify_same_storage" in s:
            same = s["classify_same_storage"]
            lines.append(f"| visionstream classify, the same images from the embedded S3 server (stream path: {s['images_per_s'] / same['images_per_s']:.0%} of it) | {_rate(same)} | | | |")
    ceiling_ = results["ceiling"]
    for key, label in (
        ("model_eager", "ceiling: model alone, uint8 crops from the host"),
        ("model_compiled", "ceiling: model alone, compiled (AOTInductor package, model.compile)"),
        ("model_cuda_graph", "ceiling: model alone, CUDA graph"),
    ):
        if key in ceiling_:
            lines.append(f"| {label} | {_rate(ceiling_[key])} | | {ceiling_[key]['images_per_s'] / ceiling_['model']['images_per_s']:.0%} | |")
    lines.append(f"| decode + resize + crop alone (CPU path), one core | {_rate(ceiling_['decode_one_core'])} | | | |")
    lines += ["", f"Stage breakdown, mean ms per batch of {results['batch_size']}:", "", "| path | fetch | decode | queue | inference | wait + publish |", "| --- |" + " ---: |" * 5]
    for path, stages in results["stages"].items():
        lines.append(f"| {path} | " + " | ".join(f"{stages.get(s, 0):.0f}" for s in ("fetch", "decode", "queue", "inference")) + f" | {stages.get('wait_and_publish', 0):.0f} |")
    return "\n".join(lines)


def _rate(figure: dict[str, Any]) -> str:
    return f"{figure['images_per_s']:.1f} ({figure['min']:.1f}-{figure['max']:.1f})"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"


def keep(results: dict[str, Any], folder: Path) -> None:
    """The figures so far, as <device>.json: a run cut short by a time limit leaves what it measured."""
    folder.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if results["machine"]["device"].startswith("cuda") else "cpu"
    (folder / f"{kind}.json").write_text(json.dumps(results | {"complete": False}, indent=2))


def write(results: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if results["machine"]["device"].startswith("cuda") else "cpu"
    text = table(results)
    (folder / f"{kind}.json").write_text(json.dumps(results, indent=2))
    (folder / f"{kind}.md").write_text(text + "\n")
    sections = []
    for name, title in (("cpu", "CPU"), ("cuda", "GPU")):
        if (folder / f"{name}.md").exists():
            sections.append(f"## {title}\n\n" + (folder / f"{name}.md").read_text())
    (folder / "latest.md").write_text("\n".join(sections))
    chart(results, folder / "stage_breakdown.png")
    print(text)
    say(f"wrote {folder / f'{kind}.md'}, {kind}.json, latest.md, stage_breakdown.png")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("fetch", "decode", "queue", "inference", "wait_and_publish")
    paths = list(results["stages"])
    fig, ax = plt.subplots(figsize=(8, 3))
    left = [0.0] * len(paths)
    for stage in stages:
        values = [results["stages"][p].get(stage, 0.0) for p in paths]
        ax.barh(paths, values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("ms per batch (mean)")
    ax.set_title(f"Where a batch's time goes ({results['machine']['gpu'] or results['machine']['cpu']})")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
