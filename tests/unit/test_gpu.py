"""The CUDA path: nvJPEG decode with its per-image fallback, uint8 batches, CUDA graphs, fp16.

The fallback logic and the device-agnostic crops run here on the CPU (libjpeg-turbo standing
in for nvJPEG); the tests marked ``gpu`` compare the GPU path with the CPU path on a CUDA device
and are skipped without one.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from inference.worker.gpu import batch_on, decode_each, device_crops, device_decodable, jpeg_decoder
from inference.worker.images import Preprocessing, as_bytes_tensor, decode_crop, read_header
from inference.worker.model import GraphedModel, load_model
from inference.settings import ImageSettings, ModelSettings, StorageSettings
from streams.embedded.samples import synthetic_photo

SPEC = Preprocessing(resize_size=232, crop_size=224)


def jpeg(seed: int, size: tuple[int, int] = (320, 260), mode: str = "RGB", orientation: int = 1, **options) -> bytes:
    image = synthetic_photo(np.random.default_rng(seed), *size).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def corrupt(data: bytes) -> bytes:
    """A JPEG with a sound header and end marker and broken scan data (two SOF markers)."""
    scan = data.index(b"\xff\xda")
    return data[: scan + 200] + b"\xff\xc0" * 50 + data[scan + 300 :]


def sample_set(count: int) -> list[bytes]:
    """Sizes from 200 to 1600 px, grayscale, progressive, 4:4:4 and rotated ones among them."""
    rng = np.random.default_rng(11)
    images = []
    for index in range(count):
        size = (int(rng.integers(200, 800)), int(rng.integers(200, 800))) if index % 10 else (1600, 1100)
        options = {"progressive": True} if index % 7 == 3 else {"subsampling": 0} if index % 7 == 5 else {}
        images.append(jpeg(index, size, "L" if index % 9 == 4 else "RGB", orientation=(1, 1, 6, 3, 8)[index % 5], **options))
    return images


# --- runs anywhere ----------------------------------------------------------------------------


def test_decode_each_decodes_a_good_list_in_one_call():
    calls: list[int] = []
    decode = jpeg_decoder("cpu")

    def recording(encoded):
        calls.append(len(encoded))
        return decode(encoded)

    out = decode_each([as_bytes_tensor(jpeg(i)) for i in range(3)], recording)
    assert calls == [3] and [tuple(t.shape) for t in out] == [(3, 260, 320)] * 3


def test_decode_each_finds_the_image_that_failed_the_batch():
    good, bad = jpeg(1), jpeg(2)[:-300]
    out = decode_each([as_bytes_tensor(d) for d in (good, bad, good)], jpeg_decoder("cpu"))
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert isinstance(out[1], RuntimeError)
    assert decode_each([], jpeg_decoder("cpu")) == []


def test_device_crops_equal_the_cpu_path_and_none_marks_a_refusal():
    items = [jpeg(1), jpeg(2, orientation=6), jpeg(3, mode="L"), jpeg(4)[:-300]]
    headers = [read_header(d, "x", 10**8) for d in items]
    assert [device_decodable(h, d) for h, d in zip(headers, items, strict=True)] == [True, True, True, False]
    crops = device_crops(list(zip(items, headers, strict=True)), SPEC, jpeg_decoder("cpu"))
    assert crops[3] is None
    for data, crop in zip(items[:3], crops[:3], strict=True):
        assert torch.equal(crop, decode_crop(data, "x", SPEC, 10**8, draft=False))


def test_cmyk_and_png_are_not_for_the_device():
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, "PNG")
    assert not device_decodable(read_header(buffer.getvalue(), "x.png", 10**8), buffer.getvalue())
    cmyk = jpeg(1, mode="CMYK")
    assert not device_decodable(read_header(cmyk, "x.jpg", 10**8), cmyk)


def test_batch_on_keeps_the_order():
    crops = [torch.full((3, 2, 2), i, dtype=torch.uint8) for i in range(4)]
    batch = batch_on(crops, torch.device("cpu"))
    assert batch.shape == (4, 3, 2, 2) and batch[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


# --- needs CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp16_on_cuda_agrees_with_fp32_on_top1():
    fp32 = load_model(ModelSettings(name="resnet18", weights="none", device="cuda", precision="fp32"))
    fp16 = load_model(ModelSettings(name="resnet18", weights="none", device="cuda", precision="auto"))
    assert fp16.precision == "fp16" and torch.backends.cudnn.benchmark
    batch = torch.randn(8, 3, 224, 224)
    a, b = fp32.predict(batch), fp16.predict(batch)
    assert b.dtype == torch.float32 and b.device.type == "cpu"
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.75


@pytest.mark.gpu
def test_nvjpeg_path_agrees_with_the_cpu_path(record_property):
    """300 JPEGs: GPU decode + GPU resize/crop against libjpeg-turbo + CPU resize/crop, per pixel
    and by the top-1 class of the same model on each batch."""
    device = torch.device("cuda")
    data = sample_set(300)
    items = [(d, read_header(d, "x", 10**8)) for d in data]
    gpu = device_crops(items, SPEC, jpeg_decoder(device))
    refused = sum(crop is None for crop in gpu)
    assert refused == 0, f"nvJPEG refused {refused} of {len(data)} plain JPEGs"
    cpu = [decode_crop(d, "x", SPEC, 10**8, draft=False) for d in data]
    levels = torch.stack([(g.cpu().int() - c.int()).abs().float().mean() for g, c in zip(gpu, cpu, strict=True)])
    worst = torch.stack([(g.cpu().int() - c.int()).abs().max() for g, c in zip(gpu, cpu, strict=True)])
    model = load_model(ModelSettings(name="resnet50", weights="none", device="cuda", precision="fp32"))
    a = torch.cat([model.predict(batch_on(gpu[i : i + 60], device)) for i in range(0, len(gpu), 60)])
    b = torch.cat([model.predict(torch.stack(cpu[i : i + 60])) for i in range(0, len(cpu), 60)])
    agreement = (a.argmax(1) == b.argmax(1)).float().mean().item()
    record_property("mean_abs_levels", levels.mean().item())
    record_property("worst_image_mean_abs_levels", levels.max().item())
    record_property("max_abs_levels", worst.max().item())
    record_property("top1_agreement", agreement)
    print(f"nvJPEG vs CPU: mean {levels.mean():.3f} levels, worst image {levels.max():.3f}, max pixel {worst.max()}, top-1 {agreement:.3f}")
    # nvJPEG's IDCT and upsampling differ from libjpeg's by design. Measured on an H200 (torch 2.11,
    # 1,200-image check): mean 0.99 grey levels, worst image 3.26, top-1 agreement 1.0. The bounds
    # leave headroom over that, and would catch a wrong colour space, orientation or crop (tens of levels).
    assert levels.mean().item() < 1.5 and levels.max().item() < 5.0
    assert agreement >= 0.95


@pytest.mark.gpu
def test_cuda_graph_equals_eager_and_pads_partial_batches():
    model = load_model(ModelSettings(name="resnet18", weights="none", device="cuda", precision="fp16"))
    graphed = GraphedModel.capture(model, 8)
    crops = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    torch.testing.assert_close(graphed.predict(crops), model.predict(crops), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(graphed.predict(crops[:3]), model.predict(crops[:3]), atol=2e-2, rtol=2e-2)
    assert graphed.predict(torch.cat([crops, crops[:2]])).shape == (10, 1000)  # larger: eager


@pytest.mark.gpu
def test_the_worker_decodes_on_the_gpu_and_falls_back_per_image(tmp_path):
    from inference.worker.plugin import ResidentModel

    settings = ModelSettings(name="resnet18", weights="none", device="cuda", precision="auto")
    plugin = ResidentModel(settings, ImageSettings(decode="auto"), StorageSettings(), warmup_batch=8)
    plugin.load(SimpleNamespace(address="tcp://127.0.0.1:1"))
    try:
        assert plugin.runner.decoder.device_decoder is not None and isinstance(plugin.runner.forward.predict.__self__, GraphedModel)
        files = {"a.jpg": jpeg(1), "b.jpg": jpeg(2, mode="CMYK"), "c.jpg": jpeg(3)[:-300], "d.jpg": b"text", "e.jpg": jpeg(5, orientation=6), "f.jpg": corrupt(jpeg(6))}
        for name, content in files.items():
            (tmp_path / name).write_bytes(content)
        results = plugin.runner.classify([str(tmp_path / name) for name in files], r"(?P<wnid>n\d{8})")
        # CMYK falls back to the CPU path; truncated and non-images are decode errors. A JPEG whose
        # scan data is corrupt but that ends properly is refused by libjpeg yet decoded by nvJPEG
        # (seen on an H200): on the GPU path it gets a prediction of its damaged pixels.
        assert [r.error.stage if r.error else None for r in results][:5] == [None, None, "decode", "decode", None]
        cpu = ResidentModel(settings.model_copy(update={"device": "cpu", "precision": "fp32"}), ImageSettings(decode="cpu"), StorageSettings())
        cpu.load(SimpleNamespace(address="tcp://127.0.0.1:1"))
        expected = cpu.runner.classify([str(tmp_path / name) for name in files], r"(?P<wnid>n\d{8})")
        # f.jpg: libjpeg refuses it; nvJPEG may decode it (then it has a prediction) or refuse it too
        assert expected[5].error is not None and expected[5].error.stage == "decode"
        assert results[5].error is None or results[5].error.stage == "decode"
        for gpu_result, cpu_result in zip(results[:5], expected[:5], strict=True):
            if cpu_result.error is None:  # the same images are readable on both paths, with the same top-1
                assert gpu_result.error is None and gpu_result.prediction.class_index == cpu_result.prediction.class_index
        cpu.teardown(None)
    finally:
        plugin.teardown(None)
