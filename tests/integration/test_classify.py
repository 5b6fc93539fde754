"""`visionstream classify` end to end: the real CLI, a real Dask cluster, real files and S3."""

from __future__ import annotations

import asyncio
import time
import json
from pathlib import Path

import boto3
import pytest
import torch
from distributed import Client
from PIL import Image

from inference.client.cluster import InferenceCluster
from inference.worker.images import decode, preprocess
from inference.worker.model import load_model, top_k
from inference.records.results import ImageResult
from inference.settings import ModelSettings
from inference.worker.plugin import PLUGIN_PREFIX
from streams.embedded.samples import generate_dataset

from .conftest import visionstream


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def plugin_loads(cluster) -> dict[str, dict[str, int]]:
    """Per worker: how many times each resident model plugin built its model."""
    with Client(cluster, timeout=30) as client:
        return client.run(lambda dask_worker: {
            name: plugin.loads for name, plugin in dask_worker.plugins.items() if name.startswith(PLUGIN_PREFIX)
        })


def test_classify_a_stanford_dogs_folder_with_corrupt_files(tmp_path: Path, dask_scheduler: str, dask_cluster, dask_env):
    paths = generate_dataset(tmp_path / "dogs", 20, bad_files=2)
    (tmp_path / "dogs" / "Images" / "n02085620-Chihuahua" / "n02085620_empty.jpg").write_bytes(b"")
    output = tmp_path / "out.jsonl"
    done = visionstream(
        "classify", str(tmp_path / "dogs"), "--weights", "none", "--batch-size", "8",
        "--scheduler", dask_scheduler, "--output", str(output), env=dask_env,
    )
    assert done.returncode == 0, done.stderr
    found = records(output)
    assert len(found) == len(paths) + 1
    assert {r["uri"] for r in found} == {str(p.resolve()) for p in paths} | {str((tmp_path / "dogs/Images/n02085620-Chihuahua/n02085620_empty.jpg").resolve())}
    good = [r for r in found if r["error"] is None]
    bad = [r for r in found if r["error"] is not None]
    assert len(good) == 20 and len(bad) == 3
    assert {r["error"]["stage"] for r in bad} == {"decode"}
    for record in good:
        assert record["model"]["name"] == "resnet50"  # the default model
        assert record["ground_truth"]["wnid"] == record["name"].split("_")[0]
        assert record["match"] == (record["prediction"]["wnid"] == record["ground_truth"]["wnid"])
        scores = [p["score"] for p in record["top_k"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert record["prediction"] == record["top_k"][0]
    assert len({r["prediction"]["score"] for r in good}) > 1  # each image's own softmax
    assert "23 images, 3 errors" in done.stderr and "images/s" in done.stderr
    loads = plugin_loads(dask_cluster)
    assert loads and all(set(per_plugin.values()) == {1} for per_plugin in loads.values())  # once per worker, 4 batches


def test_classify_with_a_checkpoint_gives_that_models_predictions(tmp_path: Path, dask_scheduler: str, dask_env):
    [image] = generate_dataset(tmp_path / "one", 1)
    base = load_model(ModelSettings(name="resnet18", weights="none", seed=7, device="cpu", precision="fp32", compile=False))
    checkpoint = tmp_path / "resnet18-tuned.pt"
    torch.save(base.module.state_dict(), checkpoint)
    output = tmp_path / "out.jsonl"
    done = visionstream(
        "classify", str(image), "--model", "resnet18", "--weights", str(checkpoint), "--precision", "fp32",
        "--scheduler", dask_scheduler, "--output", str(output), env=dask_env,
    )
    assert done.returncode == 0, done.stderr
    [record] = records(output)
    expected_scores, expected_indices = top_k(base.predict(preprocess(decode(image.read_bytes(), "x", 10**8, 232), base.preprocessing)[None]), 5)
    assert record["model"]["weights"] == str(checkpoint)
    assert [p["class_index"] for p in record["top_k"]] == expected_indices[0].tolist()
    assert record["prediction"]["score"] == pytest.approx(expected_scores[0, 0].item(), abs=1e-4)


def test_classify_reads_an_s3_prefix(tmp_path: Path, dask_scheduler: str, dask_env, services, settings):
    bucket = settings.storage.bucket
    client = boto3.client("s3", **settings.storage.boto3_kwargs())
    client.create_bucket(Bucket=bucket)
    for path in generate_dataset(tmp_path / "s3", 6, bad_files=1):
        client.put_object(Bucket=bucket, Key=f"dogs/{path.relative_to(tmp_path / 's3').as_posix()}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="other/x.jpg", Body=b"outside the prefix")
    output = tmp_path / "out.jsonl"
    done = visionstream(
        "classify", f"s3://{bucket}/dogs/", "--model", "resnet18", "--weights", "none",
        "--scheduler", dask_scheduler, "--output", str(output),
        env={"VISIONSTREAM_STORAGE__ENDPOINT_URL": services.s3_endpoint, "VISIONSTREAM_STORAGE__REGION": "us-east-1", **dask_env},
    )
    assert done.returncode == 0, done.stderr
    found = records(output)
    assert len(found) == 7 and all(r["uri"].startswith(f"s3://{bucket}/dogs/Images/") for r in found)
    assert sum(r["error"] is None for r in found) == 6
    assert all(r["ground_truth"] for r in found)


def test_a_missing_s3_object_is_a_fetch_error_record_and_the_rest_of_its_batch_is_classified(tmp_path: Path, settings, bucket):
    """A key that does not exist (deleted after its listing or its notification): the CLI's listing
    never names one, so the batch goes to the cluster directly, as both the CLI and the stream send it."""
    [image] = generate_dataset(tmp_path / "dogs", 1)
    boto3.client("s3", **settings.storage.boto3_kwargs()).put_object(Bucket=bucket, Key="dogs/present.jpg", Body=image.read_bytes())
    missing, present = f"s3://{bucket}/dogs/never-uploaded.jpg", f"s3://{bucket}/dogs/present.jpg"

    async def run() -> list[ImageResult]:
        async with InferenceCluster.from_settings(settings) as cluster:
            return await cluster.classify([missing, present])

    gone, found = asyncio.run(run())
    assert (gone.uri, found.uri) == (missing, present)  # in the order sent
    assert gone.error is not None and gone.error.stage == "fetch" and "not found" in gone.error.message, gone.error
    assert gone.prediction is None
    assert found.error is None and found.prediction is not None


def test_an_s3_object_that_is_not_an_image_is_a_decode_error_record_not_a_crash(tmp_path: Path, dask_scheduler: str, dask_env, services, settings, bucket):
    output = tmp_path / "out.jsonl"
    boto3.client("s3", **settings.storage.boto3_kwargs()).put_object(Bucket=bucket, Key="a.jpg", Body=b"x")
    done = visionstream(
        "classify", f"s3://{bucket}/a.jpg", "--model", "resnet18", "--weights", "none", "--scheduler", dask_scheduler,
        "--output", str(output),
        env={"VISIONSTREAM_STORAGE__ENDPOINT_URL": services.s3_endpoint, "VISIONSTREAM_STORAGE__REGION": "us-east-1", **dask_env},
    )
    assert done.returncode == 0, done.stderr
    [record] = records(output)
    assert record["error"]["stage"] == "decode"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "/no/such/folder", "--weights", "none", "--scheduler", "tcp://127.0.0.1:9"], "no such file, folder, or objects"),
        (["classify", "pyproject.toml", "--weights", "none", "--scheduler", "tcp://127.0.0.1:9"], "Dask cluster tcp://127.0.0.1:9 unavailable"),
        (["classify", "pyproject.toml", "--batch-size", "0"], "invalid configuration"),
        (["classify", "pyproject.toml", "--config", "/no/such.yaml"], "cannot read config file"),
        pytest.param(["classify", "pyproject.toml", "--model", "resnet18", "--weights", "/no/such.pt", "--workers", "1"],
                     "cannot load weights '/no/such.pt'", marks=pytest.mark.slow),  # an embedded cluster of its own
    ],
)
def test_fatal_problems_exit_non_zero_with_one_clear_message(args: list[str], message: str):
    done = visionstream(*args, env={"VISIONSTREAM_CLUSTER__CONNECT_TIMEOUT_S": "3"}, timeout_s=120)
    assert done.returncode != 0
    [line] = [line for line in done.stderr.splitlines() if line.startswith("visionstream: error:")]
    assert message in line
    assert "Traceback" not in done.stderr, done.stderr
    others = [other for other in done.stderr.splitlines() if other != line and ("ERROR" in other or "failed to load" in other)]
    assert not others, others  # the fatal error is said once, not also by a worker or a client library


@pytest.mark.slow  # about 45 s: an embedded cluster of its own: `make test-slow` (CI runs both)
def test_storage_credentials_only_in_a_config_file_reach_the_embedded_clusters_workers(tmp_path: Path, services, settings, bucket):
    """No AWS_* anywhere in the environment: the embedded cluster's Dask workers read S3 with the
    key pair from `--config`, as the client's listing does."""
    import os
    import subprocess
    import sys

    import yaml

    from streams.embedded.stack import S3_TEST_CREDENTIALS

    from .conftest import REPO

    client = boto3.client("s3", **settings.storage.boto3_kwargs())
    for path in generate_dataset(tmp_path / "s3", 2):
        client.put_object(Bucket=bucket, Key=f"dogs/{path.name}", Body=path.read_bytes())
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"storage": {
        "endpoint_url": services.s3_endpoint, "region": "us-east-1",
        "access_key_id": S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret_access_key": S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }, "cluster": {"n_workers": 1}}))
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "VISIONSTREAM_"))}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    output = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "streams", "classify", f"s3://{bucket}/dogs/", "--config", str(config),
         "--model", "resnet18", "--weights", "none", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = records(output)
    assert len(found) == 2 and all(record["error"] is None for record in found), found
    assert S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in done.stderr + output.read_text()


@pytest.mark.slow  # an embedded cluster of its own: `make test-slow` (CI runs both)
def test_the_embedded_clusters_workers_never_write_to_the_clients_stdout(tmp_path: Path):
    """`classify -o -` writes records to stdout; a worker's print (torch.hub's download line, say) must not land among them."""
    import subprocess
    import sys

    from .conftest import REPO

    script = (
        "import asyncio\n"
        "from inference.client.cluster import InferenceCluster\n"
        "from inference.settings import Settings\n"
        "async def main():\n"
        "    settings = Settings().with_overrides({'model': {'name': 'resnet18', 'weights': 'none'}, 'cluster': {'n_workers': 1}})\n"
        "    async with InferenceCluster.from_settings(settings) as cluster:\n"
        "        await cluster.client.run(lambda: print('printed by a worker', flush=True))\n"
        "    print('the client')\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "the client\n" and "printed by a worker" in done.stderr


def test_an_image_slow_to_decode_is_its_own_dead_letter_and_the_rest_are_predicted(tmp_path: Path, dask_scheduler: str, dask_env):
    """A 300 KB PNG of 96 megapixels of one colour, slow to decode on any CPU, among good images,
    under an images.decode_timeout_s set from this machine's own speed (a third of the PNG's
    decode time here, at most 0.3 s): it alone fails, at its deadline, on the worker."""
    import time

    from inference.worker.images import Preprocessing, decode_crop

    paths = generate_dataset(tmp_path / "dogs", 12)
    slow = tmp_path / "dogs" / "Images" / "n02085620-Chihuahua" / "n02085620_slow.png"
    Image.new("RGB", (12000, 8000), (90, 120, 30)).save(slow, "PNG")
    data = slow.read_bytes()
    began = time.perf_counter()
    decode_crop(data, "slow.png", Preprocessing(), max_pixels=10**8)
    slow_s = time.perf_counter() - began
    good_s = max(_decode_seconds(path) for path in paths)
    timeout_s = round(min(0.3, slow_s / 3), 3)
    assert good_s * 5 < timeout_s, f"this CPU decodes the PNG in {slow_s:.2f} s and a good image in {good_s:.3f} s: no deadline separates them"
    output = tmp_path / "out.jsonl"
    done = visionstream(
        "classify", str(tmp_path / "dogs"), "--weights", "none", "--model", "resnet18", "--batch-size", "13",
        "--scheduler", dask_scheduler, "--output", str(output),
        env={**dask_env, "VISIONSTREAM_IMAGES__DECODE_TIMEOUT_S": str(timeout_s), "VISIONSTREAM_IMAGES__MAX_PIXELS": str(10**8)},
    )
    assert done.returncode == 0, done.stderr
    found = {record["uri"]: record for record in records(output)}
    assert set(found) == {str(p.resolve()) for p in [*paths, slow]}
    failed = found.pop(str(slow.resolve()))
    assert failed["error"] is not None, f"decoded within {timeout_s} s on the worker (here: {slow_s:.2f} s)"
    assert failed["error"]["stage"] == "decode"
    assert f"images.decode_timeout_s ({timeout_s:g} s)" in failed["error"]["message"]
    assert all(record["error"] is None and record["prediction"] for record in found.values())


def _decode_seconds(path: Path) -> float:
    import time

    from inference.worker.images import Preprocessing, decode_crop

    data = path.read_bytes()
    began = time.perf_counter()
    decode_crop(data, path.name, Preprocessing(), max_pixels=10**8)
    return time.perf_counter() - began


@pytest.mark.slow  # two bf16 packages of resnet18 built beside the batches: about a minute on 2 cores
def test_the_shipped_defaults_from_a_cold_cache_serve_while_the_bf16_package_builds_then_run_it(tmp_path: Path, dask_scheduler: str, dask_cluster, dask_env):
    """The default (model.compile: auto) from the session's empty compile cache, at bf16 (native
    or emulated, whatever the CPU): a classify runs while the worker builds its package beside the
    batches, the worker then runs compiled, and a second classify through the package predicts
    the same classes. (Built inside the worker, this failed every cold run.)"""
    from inference.worker.plugin import model_health

    paths = generate_dataset(tmp_path / "dogs", 24)
    args = ["classify", str(tmp_path / "dogs"), "--weights", "none", "--model", "resnet18", "--precision", "bf16",
            "--batch-size", "12", "--scheduler", dask_scheduler]
    first = visionstream(*args, "--output", str(tmp_path / "first.jsonl"), env=dask_env)
    assert first.returncode == 0, first.stderr
    eager = {r["uri"]: r for r in records(tmp_path / "first.jsonl")}
    assert len(eager) == len(paths) and all(r["error"] is None and r["model"]["precision"] == "bf16" for r in eager.values())

    def forward_paths() -> set[str]:
        with Client(dask_cluster, timeout=30) as client:
            found = client.run(lambda dask_worker: [
                model_health(dask_worker, name)["forward"] for name, plugin in dask_worker.plugins.items()
                if name.startswith(PLUGIN_PREFIX) and plugin.model_settings.precision == "bf16"
            ])
        return {path for paths in found.values() for path in paths}

    deadline = time.monotonic() + 400
    while (paths_now := forward_paths()) != {"compiled"} and time.monotonic() < deadline:
        assert paths_now <= {"compiling", "compiled"}, paths_now  # never given up
        time.sleep(1)
    assert forward_paths() == {"compiled"}
    second = visionstream(*args, "--output", str(tmp_path / "second.jsonl"), env=dask_env)
    assert second.returncode == 0, second.stderr
    compiled = {r["uri"]: r for r in records(tmp_path / "second.jsonl")}
    assert compiled.keys() == eager.keys()
    same = sum(compiled[uri]["prediction"]["class_index"] == eager[uri]["prediction"]["class_index"] for uri in eager)
    assert same >= 0.9 * len(eager), f"{same} of {len(eager)} agree"


def test_classify_records_are_ascii_json_whatever_the_file_names_hold(tmp_path: Path, dask_scheduler: str, dask_env):
    """A name with a bidi override or a C1 control (U+009B: a CSI to many terminals) reaches the
    terminal \\u-escaped, as the events carry it."""
    [path] = generate_dataset(tmp_path / "dogs", 1)
    folder = Path(path).parent
    names = ["n02085620_\u202egpj.jpg", "n02085620_\u009b31m.jpg"]
    for name in names:
        (folder / name).write_bytes(Path(path).read_bytes())
    done = visionstream("classify", str(tmp_path / "dogs"), "--weights", "none", "--model", "resnet18",
                        "--scheduler", dask_scheduler, "--output", "-", env=dask_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.isascii() and "\\u202e" in done.stdout and "\\u009b" in done.stdout
    uris = {json.loads(line)["uri"] for line in done.stdout.splitlines()}
    assert {Path(uri).name for uri in uris} >= set(names)
