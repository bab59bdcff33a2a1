"""Feature extractors by name: `load_extractor(name, checkpoint=None, **conf) -> Extractor`.

| name         | what                                                   | weights                      |
|--------------|--------------------------------------------------------|------------------------------|
| `classic`    | weight-free multi-scale patch descriptors              | none                         |
| `intensity`  | blurred intensity patches (alignment tests)            | none                         |
| `unet-vgg16` | PixLoc UNet, VGG16 encoder                             | a PixLoc checkpoint_best.tar |
| `unet-vgg19` | PixLoc UNet, VGG19 encoder                             | a PixLoc checkpoint_best.tar |
| `unet-small` | narrow UNet trained with `pixloc train`                | `--checkpoint`, or shipped   |
| `alike-t/s/n/l` | ALIKE (dense descriptors at stride 1 + keypoints); `alike-n` is DEFAULT | shipped (authors' state dicts) |
| `xfeat`      | XFeat (64-d descriptors at stride 8 + keypoints)       | shipped (converted ONNX export) |

ALIKE and XFeat read their shipped weights from `pixloc_core/weights/`, or the file passed as
`checkpoint`: a plain state dict, or a checkpoint of `pixloc train` (ALIKE with learned
confidence heads and dampings); they also give `extractor.keypoints(images)` for the sparse path.

A UNet needs weights: the `checkpoint` argument, else `pixloc_core/weights/<name>.tar` when the
repository ships one. Checkpoints may carry the alignment's learned dampings, exposed as
`extractor.dampings` ((3, 6), PixLoc order: finest level first), ready for
`FeaturemetricAligner.load_dampings`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .alike import VARIANTS as ALIKE_VARIANTS
from .alike import AlikeConf, load_alike
from .base import Extractor, default_device
from .checkpoint import (CheckpointError, is_training_checkpoint, load_extractor_state, read_checkpoint,
                         split_model_state)
from .classic import ClassicConf, ClassicExtractor
from .intensity import IntensityConf, IntensityExtractor
from .unet import UNetExtractor
from .xfeat import XFeatConf, load_xfeat
from .unet import default_conf as unet_default_conf

logger = logging.getLogger(__name__)

# What `pixloc features` extracts unless told otherwise: the extractor that wins `pixloc bench
# real` on real photos (README, **Which default extractor**); `classic` is 7x cheaper on a CPU.
DEFAULT = "alike-n"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

# UNet variants: name -> config overrides of `unet.default_conf`.
UNETS = {
    "unet-vgg16": {"encoder": "vgg16"},
    "unet-vgg19": {"encoder": "vgg19"},
    "unet-small": {"encoder": "small", "decoder": (16, 16, 16, 16), "output_dim": (16, 16, 16), "max_size": 640},
}
WEIGHT_FREE = {"classic": (ClassicExtractor, ClassicConf), "intensity": (IntensityExtractor, IntensityConf)}
# Pretrained third-party networks: name -> (loader(name, weights, conf), conf class, shipped weights).
PRETRAINED = {name: (load_alike, AlikeConf, WEIGHTS_DIR / "alike" / f"{name}.pth") for name in ALIKE_VARIANTS}
PRETRAINED["xfeat"] = (load_xfeat, XFeatConf, WEIGHTS_DIR / "xfeat" / "xfeat.pt")
# What `pixloc train` learns: UNets whole; ALIKE variants' confidences and dampings, their network frozen.
TRAINABLE = (*UNETS, *ALIKE_VARIANTS)


def _make_conf(name: str, conf_class: type, conf: dict):
    unknown = set(conf) - set(conf_class.__dataclass_fields__)
    if unknown:
        raise ValueError(f"extractor {name!r}: unknown config keys {sorted(unknown)}")
    return conf_class(**conf)


def shipped_weights(name: str) -> Path | None:
    path = WEIGHTS_DIR / f"{name}.tar"
    return path if path.is_file() else None


def available_extractors() -> list[str]:
    """Names that `load_extractor` can build right now without a checkpoint argument."""
    return (sorted(WEIGHT_FREE) + sorted(name for name in UNETS if shipped_weights(name))
            + sorted(name for name, (_, _, weights) in PRETRAINED.items() if weights.is_file()))


def trainable_extractor(name: str, extractor_conf: dict | None = None) -> Extractor:
    """What `pixloc train` starts from: a randomly initialised UNet (all of it trained), or an ALIKE
    variant with the authors' weights frozen and learned confidence heads (only those trained)."""
    extractor_conf = dict(extractor_conf or {})
    if name in UNETS:
        return build_unet(name, **extractor_conf)
    if name in ALIKE_VARIANTS:
        loader, conf_class, weights = PRETRAINED[name]
        extractor = loader(name, weights, _make_conf(name, conf_class, {**extractor_conf, "confidence": "learned"}))
        for parameter_name, parameter in extractor.named_parameters():
            parameter.requires_grad_(parameter_name.startswith("confidence_heads."))
        return extractor
    raise ValueError(f"cannot train {name!r}, expected one of {list(TRAINABLE)}")


def _with_checkpoint_weights(extractor: Extractor, checkpoint: Path, content: dict) -> Extractor:
    """The extractor with every weight of a PixLoc-layout checkpoint, and its dampings."""
    extractor_state, extractor.dampings = split_model_state(content, checkpoint)
    load_extractor_state(extractor, extractor_state, checkpoint)
    logger.info("Loaded %s from %s%s", extractor.name, checkpoint,
                " with dampings" if extractor.dampings is not None else "")
    return extractor


def _load_trained_alike(name: str, checkpoint: Path, conf: dict) -> Extractor:
    """An ALIKE variant from a checkpoint of `pixloc train`: its saved config (under `conf`'s
    overrides), every weight from the file."""
    content = read_checkpoint(checkpoint)
    saved = content.get("conf", {})
    if saved.get("extractor", name) != name:
        raise CheckpointError(f"{checkpoint}: a checkpoint of {saved['extractor']!r}, not of {name!r}")
    extractor = trainable_extractor(name, {**saved.get("extractor_conf", {}), **conf}).requires_grad_(False)
    return _with_checkpoint_weights(extractor, checkpoint, content)


def build_unet(name: str, **conf) -> UNetExtractor:
    """A randomly initialised UNet of a registered variant (training starts here)."""
    if name not in UNETS:
        raise ValueError(f"unknown UNet {name!r}, expected one of {sorted(UNETS)}")
    unknown = set(conf) - set(unet_default_conf)
    if unknown:
        raise ValueError(f"extractor {name!r}: unknown config keys {sorted(unknown)}")
    return UNetExtractor(name, {**UNETS[name], **conf})


def load_extractor(name: str = DEFAULT, checkpoint: Path | None = None, **conf) -> Extractor:
    """An extractor in eval mode on the default device (CUDA when present).

    conf overrides fields of the extractor's config (e.g. `max_size=512`).
    """
    if name in WEIGHT_FREE:
        if checkpoint is not None:
            raise ValueError(f"extractor {name!r} has no weights, but a checkpoint was given: {checkpoint}")
        extractor_class, conf_class = WEIGHT_FREE[name]
        extractor = extractor_class(_make_conf(name, conf_class, conf))
    elif name in ALIKE_VARIANTS and checkpoint is not None and is_training_checkpoint(Path(checkpoint)):
        extractor = _load_trained_alike(name, Path(checkpoint), conf)
    elif name in PRETRAINED:
        loader, conf_class, weights = PRETRAINED[name]
        weights = Path(checkpoint) if checkpoint is not None else weights
        extractor = loader(name, weights, _make_conf(name, conf_class, conf))
        logger.info("Loaded %s from %s", name, weights)
    elif name in UNETS:
        checkpoint = Path(checkpoint) if checkpoint is not None else shipped_weights(name)
        if checkpoint is None:
            raise ValueError(f"extractor {name!r} needs weights: pass a checkpoint (e.g. PixLoc's "
                             f"checkpoint_best.tar or one written by `pixloc train`)")
        extractor = _with_checkpoint_weights(build_unet(name, **conf), checkpoint, read_checkpoint(checkpoint))
    else:
        raise ValueError(f"unknown extractor {name!r}, expected one of "
                         f"{sorted(WEIGHT_FREE) + sorted(UNETS) + sorted(PRETRAINED)}")
    return extractor.eval().to(default_device())


__all__ = ["DEFAULT", "TRAINABLE", "CheckpointError", "Extractor", "available_extractors", "build_unet",
           "load_extractor", "trainable_extractor"]
