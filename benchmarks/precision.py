"""How far reduced precision agrees with fp32: top-1 agreement and score drift, per image.

    python -m benchmarks.precision [--weights SPEC] [--source DIR] [--images N] [--device cpu|cuda]

The figure that matters is with the weights you deploy (pretrained or your checkpoint);
with random weights (``--weights none``, the default where nothing can be downloaded) the
logits are nearly flat and agreement is a worst case.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from inference.worker.images import decode, preprocess
from inference.worker.model import load_model
from inference.settings import ModelSettings
from streams.embedded.samples import generate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.precision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--source", help="folder of images (default: generated)")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.source or scratch)
        if not args.source:
            generate_dataset(folder, args.images, seed=3)
        paths = sorted(p for p in folder.rglob("*") if p.is_file())[: args.images]
        reference = load_model(ModelSettings(name=args.model, weights=args.weights, device=args.device, precision="fp32"))
        batch = torch.stack([preprocess(decode(p.read_bytes(), str(p), 10**8, reference.preprocessing.resize_size), reference.preprocessing) for p in paths])
        base = reference.predict(batch).softmax(1)
        report = {"model": args.model, "weights": args.weights, "device": args.device, "images": len(paths), "agreement": {}}
        for precision in ("bf16", "fp16"):
            try:
                other = load_model(ModelSettings(name=args.model, weights=args.weights, device=args.device, precision=precision))
                probs = other.predict(batch).softmax(1)
            except RuntimeError as exc:
                report["agreement"][precision] = f"unsupported here: {exc}"
                continue
            top1 = (probs.argmax(1) == base.argmax(1)).float().mean().item()
            drift = (probs.max(1).values - base.max(1).values).abs().max().item()
            report["agreement"][precision] = {"top1_agreement": top1, "max_top1_score_difference": drift}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
