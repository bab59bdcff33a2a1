"""`pixloc train`: learn features (and dampings) from posed images (see pixloc_core.train).

    pixloc train --out DIR                                   # synthetic scenes, unet-small
    pixloc train --out DIR --model MODEL --images IMAGES     # a COLMAP model with posed images
    pixloc train --out DIR --extractor alike-n ...           # ALIKE's confidences and dampings only

Re-running with the same --out resumes from DIR/checkpoint_last.tar; load the result with
`load_extractor(NAME, checkpoint=DIR/checkpoint_last.tar)` or `--extractor NAME --checkpoint ...`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pixloc_core import train
from pixloc_core.extractors import TRAINABLE

from .config import merge_conf

default_conf = train.default_conf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    conf, data = train.default_conf, train.default_conf["data"]
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory (resumed when it has one)")
    parser.add_argument("--extractor", default=conf["extractor"], choices=TRAINABLE,
                        help="a UNet (trained whole) or an ALIKE variant (its confidence heads and the dampings)")
    parser.add_argument("--steps", type=int, default=conf["num_steps"], help="total optimisation steps")
    parser.add_argument("--seed", type=int, default=conf["seed"])
    parser.add_argument("--lr", type=float, default=conf["learning_rate"], help="learning rate (Adam)")
    parser.add_argument("--pairs-per-step", type=int, default=conf["pairs_per_step"])
    parser.add_argument("--scenes", type=int, default=data["scene_seeds"][1] - data["scene_seeds"][0],
                        help="synthetic scenes to render pairs from")
    parser.add_argument("--pairs-per-scene", type=int, default=data["pairs_per_scene"])
    parser.add_argument("--width", type=int, default=data["width"], help="synthetic image width")
    parser.add_argument("--height", type=int, default=data["height"], help="synthetic image height")
    parser.add_argument("--model", type=Path,
                        help="COLMAP model with posed images and 3D points, instead of synthetic scenes")
    parser.add_argument("--images", type=Path, help="image directory of --model")
    parser.add_argument("--max-size", type=int, default=data["max_size"], help="longest side of --images when training")
    parser.add_argument("--export", type=Path, metavar="FILE",
                        help="also write the final weights without the optimizer state "
                             "(e.g. pixloc_core/weights/unet-small.tar)")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "pairs_per_step", "scenes", "pairs_per_scene", "width", "height", "max_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"pixloc train: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.model is None) != (args.images is None):
        raise SystemExit("pixloc train: --model and --images go together")
    first_scene = train.default_conf["data"]["scene_seeds"][0]
    data = {"scene_seeds": (first_scene, first_scene + args.scenes), "pairs_per_scene": args.pairs_per_scene,
            "width": args.width, "height": args.height, "max_size": args.max_size}
    if args.model is not None:
        data.update(source="colmap", model_dir=args.model, image_dir=args.images)
    checkpoint = train.main(args.out, merge_conf(default_conf, {
        "extractor": args.extractor, "num_steps": args.steps, "seed": args.seed, "learning_rate": args.lr,
        "pairs_per_step": args.pairs_per_step, "data": data,
    }, args.conf))
    print(f"checkpoint: {checkpoint}")
    if args.export is not None:
        print(f"weights: {train.export_weights(checkpoint, args.export)}")
    return 0
