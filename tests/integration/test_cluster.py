"""The model plugin on a real Dask cluster: no secret on the scheduler, one resident model per
configuration whatever the credentials, and a superseded configuration released."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from pydantic import SecretStr

from inference.client.cluster import InferenceCluster
from inference.client.embedded import embedded_cluster, reaching
from inference.settings import ClusterSettings, ImageSettings, ModelSettings, StorageSettings
from inference.worker.plugin import PLUGIN_PREFIX


def resident(dask_worker) -> dict[str, bool]:
    return {name: plugin.loaded is not None for name, plugin in dask_worker.plugins.items() if name.startswith(PLUGIN_PREFIX)}


def test_rotated_secrets_share_one_model_and_a_new_configuration_retires_the_old(tmp_path):
    async def run() -> None:
        async with embedded_cluster(ClusterSettings(gpu=False, threads_per_worker=1), asynchronous=True) as local:
            settings = ClusterSettings(**reaching(local))
            # compile off: short-lived clusters about secrets and retirement, closed before a build could end
            model = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)
            clusters = []
            for secret in ("first-secret-abc", "rotated-secret-xyz"):
                cluster = InferenceCluster(settings, model, ImageSettings(), StorageSettings(access_key_id="K", secret_access_key=SecretStr(secret)), r"(?P<wnid>n\d{8})", lineage="stream:a")
                await cluster.start()
                clusters.append(cluster)
            client = clusters[0].client
            [models] = (await client.run(resident)).values()
            assert list(models.values()) == [True]  # one resident model for both secrets
            stored = await client.run_on_scheduler(lambda dask_scheduler: dict(dask_scheduler.worker_plugins))
            for blob in stored.values():  # what the scheduler keeps and hands to every worker
                assert b"first-secret-abc" not in blob and b"rotated-secret-xyz" not in blob
                assert b"first-secret-abc" not in pickle.dumps(blob)

            peer = InferenceCluster(settings, model.model_copy(update={"top_k": 4}), ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})", lineage="stream:b")
            notebook = InferenceCluster(settings, model.model_copy(update={"top_k": 2}), ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})")
            newer = InferenceCluster(settings, model.model_copy(update={"top_k": 3}), ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})", lineage="stream:a")
            for other in (peer, notebook, newer):
                await other.start()
            [models] = (await client.run(resident)).values()
            assert len(models) == 4
            assert await notebook.retire_superseded(idle_s=0) == []  # a notebook's client supersedes nothing
            retired = await newer.retire_superseded(idle_s=0)
            assert retired == [clusters[0].plugin.name]  # its own line's older configuration, not the peer's or the notebook's
            [models] = (await client.run(resident)).values()
            assert sorted(models) == sorted([newer.plugin.name, peer.plugin.name, notebook.plugin.name])  # the old model was released
            for cluster in [*clusters, peer, notebook, newer]:
                await cluster.close()

    asyncio.run(run())


def test_a_model_that_failed_to_load_is_loaded_again_once_its_checkpoint_exists(tmp_path, dask_reach):
    """A stream worker starts before its checkpoint is in place: start-up fails loudly. The
    scheduler keeps the registered plugin and never sets it up again; the restarted stream
    worker's batches must still get a model: the worker loads it again after its backoff."""
    import time

    import torch

    from inference.errors import ModelLoadFailed, WeightsUnavailable
    from inference.worker.model import load_model
    from streams.embedded.samples import generate_dataset

    checkpoint = tmp_path / "resnet18-late.pt"
    # compile off: about a late checkpoint; each reload would start a build beside the test
    model = ModelSettings(name="resnet18", weights=str(checkpoint), device="cpu", precision="fp32", compile=False)
    [image] = generate_dataset(tmp_path / "one", 1)
    settings = ClusterSettings(**dask_reach)

    async def run() -> None:
        first = InferenceCluster(settings, model, ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})")
        with pytest.raises(WeightsUnavailable, match="not found"):
            await first.start()
        torch.save(load_model(ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)).module.state_dict(), checkpoint)
        second = InferenceCluster(settings, model, ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})")
        await second.start()  # registering again is a no-op on the scheduler
        deadline = time.monotonic() + 60
        while True:
            try:
                [result] = await second.classify([str(image)])
                break
            except ModelLoadFailed as exc:  # within the worker's backoff: says why
                assert "not found" in exc.reason and time.monotonic() < deadline
                await asyncio.sleep(0.5)
        assert result.error is None and result.prediction is not None
        assert set((await second.model_loads()).values()) == {1}
        await first.close()
        await second.close()

    asyncio.run(run())


def test_the_embedded_cluster_admits_only_peers_with_its_certificate():
    """Loopback is every local user's: without the cluster's own certificate nobody can connect,
    let alone register a worker or run code; with it (``reaching``) a client classifies."""
    import pytest
    from distributed import Client

    async def run() -> None:
        async with embedded_cluster(ClusterSettings(gpu=False, threads_per_worker=1), asynchronous=True) as local:
            address = local.scheduler_address
            assert address.startswith("tls://127.0.0.1:")
            plain = address.replace("tls://", "tcp://")
            for attempt in (address, plain):
                with pytest.raises((OSError, TimeoutError, TypeError)):  # refused, whichever way
                    await Client(attempt, asynchronous=True, timeout=3)
            # compile off: a short-lived cluster about TLS, closed before a build could end
            cluster = InferenceCluster(ClusterSettings(**reaching(local)), ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False), ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})")
            await cluster.start()
            assert (await cluster.threads()) and cluster.client.status == "running"
            await cluster.close()

    asyncio.run(run())


def test_time_queued_behind_other_batches_does_not_count_toward_batch_timeout(tmp_path):
    """One worker thread, live batches kept queued at a higher priority than a backfill batch for
    three times its batch.timeout_s, while the worker says it starts each of them (events on the
    scheduler). The backfill's deadline counts from when a worker starts it, so it waits its turn
    and is classified, never timed out (and never isolated)."""
    import io
    import itertools
    import time

    from PIL import Image

    from inference.settings import BatchSettings
    from streams.service.attempts import BatchAttempts
    from streams.service.metrics import StreamMetrics

    photos = []
    for index in range(12):
        buffer = io.BytesIO()
        Image.new("RGB", (320, 240), (index * 20, 120, 40)).save(buffer, "PNG")
        path = tmp_path / f"n02085620_{index}.png"
        path.write_bytes(buffer.getvalue())
        photos.append(str(path))
    timeout_s = 3.0  # longer than one batch takes, even on a loaded machine

    async def run() -> None:
        async with embedded_cluster(ClusterSettings(gpu=False, n_workers=1, threads_per_worker=1), asynchronous=True) as local:
            # compile off: a short-lived cluster about queueing, closed before a build could end
            model = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)
            cluster = InferenceCluster(ClusterSettings(**reaching(local)), model, ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})")
            await cluster.start()
            try:
                # warm: the first batch on a worker also starts its decoder processes (seconds)
                await cluster.classify(photos[:1])
                live_photos = itertools.cycle(photos[1:])
                with cluster.starts([photos[1]]) as first_started:
                    in_flight = {asyncio.ensure_future(cluster.classify([next(live_photos)], priority=10)) for _ in range(3)}
                    await asyncio.wait_for(first_started.wait(), timeout=120)  # the worker is busy: what follows queues
                counters = StreamMetrics()
                attempts = BatchAttempts(cluster.classify, BatchSettings(timeout_s=timeout_s, queue_timeout_s=300, retry_timeout_s=0), counters, cluster)
                began = time.monotonic()
                backfill = asyncio.ensure_future(attempts.run([photos[0]], 0))
                live_batches = 0
                while time.monotonic() - began < 3 * timeout_s:  # live traffic ahead of it all along
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    live_batches += len(done)
                    for batch in done:
                        batch.result()
                    while len(in_flight) < 3:
                        in_flight.add(asyncio.ensure_future(cluster.classify([next(live_photos)], priority=10)))
                    assert not backfill.done(), "the backfill ran before the live batches queued ahead of it"
                [result] = await asyncio.wait_for(backfill, timeout=120)
                waited = time.monotonic() - began
                assert result.prediction is not None and result.error is None
                assert waited > 3 * timeout_s and live_batches > 3, (waited, live_batches)  # queued past its deadline, work moving
                assert counters.batch_retries == 0
                await asyncio.gather(*in_flight)
            finally:
                await cluster.close()

    asyncio.run(run())
