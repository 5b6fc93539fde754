"""The CUDA path: fp16 autocast, channels_last, pinned non-blocking copies. Skipped without a GPU."""

import pytest
import torch

from inference.model import load_model
from inference.settings import ModelSettings


@pytest.mark.gpu
def test_fp16_on_cuda_agrees_with_fp32_on_top1():
    fp32 = load_model(ModelSettings(name="resnet18", weights="none", device="cuda", precision="fp32"))
    fp16 = load_model(ModelSettings(name="resnet18", weights="none", device="cuda", precision="auto"))
    assert fp16.precision == "fp16" and torch.backends.cudnn.benchmark
    batch = torch.randn(8, 3, 224, 224)
    a, b = fp32.predict(batch), fp16.predict(batch)
    assert b.dtype == torch.float32 and b.device.type == "cpu"
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.75
