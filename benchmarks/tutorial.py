"""The tutorial's method, re-implemented faithfully as the baseline (bugs included).

Per image: open, decode, Resize(256) + CenterCrop(250) + ToTensor, no normalisation; the
paths in batches of 60 as dask.delayed tasks; inside every batch the model is rebuilt, its
weights reloaded and moved to the device with the batch (``resnet.to(device)``,
``images.to(device)``: the GPU where there is one, as the tutorial ran), fp32; the first
image's softmax used for every image; a regex on breed names as the match; one pickle written
per image. Only the weights source differs: the tutorial downloaded them
(``pretrained=True``), this reads the same state_dict from a local file each batch, since
nothing may be downloaded here. The cluster it runs on is the caller's (benchmarks.run gives
it the tutorial's shape: one worker per GPU, all the host's cores as threads).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import dask
import torch
from PIL import Image
from torchvision import models, transforms


@dask.delayed
def preprocess(path: str) -> list:
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(250), transforms.ToTensor()])
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
        nvis = transform(img)
    truth = re.search("Images/n[0-9]+-([^/]+)/n[0-9]+_[0-9]+.jpg", path).group(1)
    name = re.search("Images/n[0-9]+-[a-zA-Z-_]+/(n[0-9]+_[0-9]+).jpg", path).group(1)
    return [name, nvis, truth]


@dask.delayed
def reformat(batch: list) -> list:
    flat_list = [item for item in batch]
    tensors = [x[1] for x in flat_list]
    names = [x[0] for x in flat_list]
    labels = [x[2] for x in flat_list]
    return [names, tensors, labels]


def evaluate_pred_batch(batch, gtruth, classes):
    _, indices = torch.sort(batch, descending=True)
    percentage = torch.nn.functional.softmax(batch, dim=1)[0] * 100
    preds = []
    labslist = []
    for i in range(len(batch)):
        pred = [(classes[idx], percentage[idx].item()) for idx in indices[i][:1]]
        preds.append(pred)
        labslist.append(gtruth[i])
    return (preds, labslist)


def is_match(la, ev):
    return bool(re.search(la.replace("_", " "), str(ev).replace("_", " ")))


@dask.delayed
def run_batch_to_disk(iteritem: list, weights_path: str, classes: list[str], out_dir: str, device_name: str = "cpu") -> list:
    names, images, truelabels = iteritem
    device = torch.device(device_name)
    images = torch.stack(images).to(device)
    with torch.no_grad():
        resnet = models.resnet50()
        resnet.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        resnet.eval()
        resnet.to(device)
        pred_batch = resnet(images)
        preds, labslist = evaluate_pred_batch(pred_batch, truelabels, classes)
        for j in range(0, len(images)):
            outcome = {"name": names[j], "ground_truth": labslist[j], "prediction": preds[j], "evaluation": is_match(labslist[j], preds[j])}
            with open(Path(out_dir) / f"{names[j]}.pkl", "wb") as f:
                pickle.dump(outcome, f)
    return names


def run(client, paths: list[str], weights_path: str, classes: list[str], out_dir: str, device: str = "cpu") -> int:
    batches = [paths[i : i + 60] for i in range(0, len(paths), 60)]
    image_batches = [reformat([preprocess(p) for p in batch]) for batch in batches]
    futures = client.compute([run_batch_to_disk(b, weights_path, classes, out_dir, device) for b in image_batches])
    return sum(len(names) for names in client.gather(futures))
