"""Changing the model of a running stream (`visionstream model set`), on the real broker, S3
server, Dask cluster and `visionstream worker`: the version changes at a batch boundary, every
upload is predicted once, a checkpoint that does not load keeps the model in use, and a
restarted worker keeps the swap."""

from __future__ import annotations

import hashlib
import urllib.request
from collections import Counter

import pytest

from .conftest import collect_events, create_topics, drain_topic, visionstream, write_config
from .test_stream import put_images


def versions(events: dict[str, list[dict]], uris: set[str]) -> Counter:
    return Counter(event["model"]["version"] for uri in uris for event in events[uri] if event["schema"].startswith("visionstream.prediction"))


@pytest.mark.timeout(900)
def test_a_model_set_mid_stream_switches_between_batches_keeps_the_old_model_on_a_bad_checkpoint_and_survives_a_restart(settings, bucket, tmp_path, start_worker):
    import torch

    from inference.settings import ModelSettings
    from inference.worker.model import load_model

    create_topics(settings)
    config = write_config(settings, tmp_path / "visionstream.yaml")
    worker = start_worker(settings)
    worker.wait_ready()
    before = put_images(settings, tmp_path, 6, prefix="before/")
    events = collect_events(settings, before)
    assert versions(events, before) == Counter({"random:seed=0": 6}), worker.log_tail()

    torch.manual_seed(7)  # other weights than the configured random init
    checkpoint = tmp_path / "candidate.pt"
    torch.save(load_model(ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)).module.state_dict(), checkpoint)
    version = "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()  # as model.version names a checkpoint

    swapped = visionstream("model", "set", "--weights", str(checkpoint), "--config", str(config), timeout_s=600)
    assert swapped.returncode == 0, swapped.stdout + swapped.stderr + worker.log_tail()
    assert f"now serves version {version}" in swapped.stdout
    after = put_images(settings, tmp_path, 6, prefix="after/")
    events = collect_events(settings, before | after)
    assert versions(events, after) == Counter({version: 6}), worker.log_tail()

    refused = visionstream("model", "set", "--weights", str(tmp_path / "missing.pt"), "--config", str(config))
    assert refused.returncode == 2 and "no such file" in refused.stderr  # checked here, nothing published
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    failed = visionstream("model", "set", "--weights", str(corrupt), "--config", str(config), timeout_s=600)
    assert failed.returncode == 1 and "the model in use kept" in failed.stderr, failed.stdout + failed.stderr
    assert "not a torch state_dict file" in failed.stderr or "cannot be loaded" in failed.stderr, failed.stderr
    kept = put_images(settings, tmp_path, 3, prefix="kept/")
    events = collect_events(settings, before | after | kept)
    assert versions(events, kept) == Counter({version: 3}), worker.log_tail()
    assert worker.health()["status"] == "ready"
    metrics = urllib.request.urlopen(worker.url.replace("/health", "/metrics"), timeout=5).read().decode()
    assert 'visionstream_model_swaps_total{outcome="swapped"} 1.0' in metrics
    assert 'visionstream_model_swaps_total{outcome="failed"} 1.0' in metrics

    status = visionstream("model", "status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    in_force = next(line for line in status.stdout.splitlines() if line.startswith("in force:"))
    latest = next(line for line in status.stdout.splitlines() if line.startswith("latest:"))
    assert str(checkpoint) in in_force and str(corrupt) in latest and "failed, the model in force kept" in status.stdout, status.stdout
    worker.stop()
    restarted = start_worker(settings, name="restarted")
    restarted.wait_ready()
    again = put_images(settings, tmp_path, 3, prefix="again/")
    events = collect_events(settings, before | after | kept | again)
    assert versions(events, again) == Counter({version: 3}), restarted.log_tail()  # the swap that loaded, not the one that failed

    everything = before | after | kept | again
    predicted = Counter(event["uri"] for event in drain_topic(settings, settings.topics.predictions))
    assert {uri: predicted[uri] for uri in everything} == dict.fromkeys(everything, 1)  # each once, none lost


def always_chihuahua(path, bias: float) -> str:
    """A resnet18 checkpoint that says Chihuahua (ImageNet class 151) for every image: on
    Chihuahua-labelled uploads its top-1 is 1.0, where random weights score about 0."""
    import torch

    from inference.settings import ModelSettings
    from inference.worker.model import load_model

    state = load_model(ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)).module.state_dict()
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    state["fc.bias"][151] = bias
    torch.save(state, path)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def put_chihuahuas(settings, tmp_path, count: int, prefix: str) -> set[str]:
    import asyncio

    from streams.embedded.samples import generate_dataset
    from streams.service.uploads import upload_paths

    root = tmp_path / f"dogs-{prefix.strip('/')}"
    generate_dataset(root, count, seed=len(prefix), classes=(("n02085620", "Chihuahua"),))
    asyncio.run(upload_paths([str(root / "Images")], prefix, settings, notify=True))
    return {f"s3://{settings.storage.bucket}/{prefix}{path.relative_to(root).as_posix()}" for path in (root / "Images").rglob("*.jpg")}


@pytest.mark.timeout(900)
def test_a_canary_worse_on_labelled_images_is_rolled_back_and_one_as_good_is_promoted(settings, bucket, tmp_path, start_worker):
    """The serving model says Chihuahua for every image; uploads are Chihuahuas. A canary with
    random weights scores about 0 on its share and is rolled back by itself; one that also says
    Chihuahua is as good, is promoted by itself, and then serves every image."""
    from .conftest import wait_until

    serving = always_chihuahua(tmp_path / "serving.pt", 10.0)
    settings = settings.with_overrides({"model": {"weights": str(tmp_path / "serving.pt")}})
    create_topics(settings)
    config = write_config(settings, tmp_path / "visionstream.yaml")
    worker = start_worker(settings)
    worker.wait_ready()

    def verdicts() -> list[dict]:
        return [record for record in drain_topic(settings, settings.topics.models, idle_s=1.0) if record.get("kind") in ("promoted", "rolled-back")]

    started = visionstream("model", "canary", "--weights", "none", "--share", "0.5", "--min-labelled", "8", "--config", str(config), timeout_s=600)
    assert started.returncode == 0 and "sends 50% of the images to version random:seed=0" in started.stdout, started.stdout + started.stderr + worker.log_tail()
    first = put_chihuahuas(settings, tmp_path, 40, "first/")
    events = collect_events(settings, first)
    assert set(versions(events, first)) == {serving, "random:seed=0"}, worker.log_tail()  # split by key
    [rolled_back] = wait_until(verdicts, 120, "the canary's verdict", worker.log_tail)
    assert rolled_back["kind"] == "rolled-back", rolled_back
    assert rolled_back["stats"]["serving"]["top1"] == 1.0 and rolled_back["stats"]["candidate"]["top1"] < 0.5
    after = put_chihuahuas(settings, tmp_path, 10, "after-rollback/")
    assert versions(collect_events(settings, after), after) == Counter({serving: 10}), worker.log_tail()

    candidate = always_chihuahua(tmp_path / "candidate.pt", 9.0)
    started = visionstream("model", "canary", "--weights", str(tmp_path / "candidate.pt"), "--share", "0.5", "--min-labelled", "8", "--config", str(config), timeout_s=600)
    assert started.returncode == 0, started.stdout + started.stderr
    second = put_chihuahuas(settings, tmp_path, 40, "second/")
    collect_events(settings, second)
    promoted = wait_until(lambda: [record for record in verdicts() if record["kind"] == "promoted"], 120, "the promotion", worker.log_tail)[0]
    assert promoted["stats"]["candidate"]["top1"] == 1.0
    wait_until(lambda: "visionstream_model_swaps_total{outcome=\"swapped\"} 1.0" in urllib.request.urlopen(worker.url.replace("/health", "/metrics"), timeout=5).read().decode(),
               120, "the promoted candidate swapped in", worker.log_tail)
    last = put_chihuahuas(settings, tmp_path, 10, "after-promotion/")
    assert versions(collect_events(settings, last), last) == Counter({candidate: 10}), worker.log_tail()
    status = visionstream("model", "status", "--config", str(config))
    assert "canary:" in status.stdout and "promoted" in status.stdout and str(tmp_path / "candidate.pt") in status.stdout, status.stdout
    everything = first | after | second | last
    predicted = Counter(event["uri"] for event in drain_topic(settings, settings.topics.predictions))
    assert {uri: predicted[uri] for uri in everything} == dict.fromkeys(everything, 1)
