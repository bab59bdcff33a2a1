"""Feature extractors by name: `load_extractor(name, checkpoint=None, **conf) -> Extractor`.

| name         | what                                                   | weights                      |
|--------------|--------------------------------------------------------|------------------------------|
| `classic`    | weight-free multi-scale patch descriptors (DEFAULT)    | none                         |
| `intensity`  | blurred intensity patches (alignment tests)            | none                         |
| `unet-vgg16` | PixLoc UNet, VGG16 encoder                             | a PixLoc checkpoint_best.tar |
| `unet-vgg19` | PixLoc UNet, VGG19 encoder                             | a PixLoc checkpoint_best.tar |
| `unet-small` | narrow UNet trained with `pixloc train`                | `--checkpoint`, or shipped   |

A UNet needs weights: the `checkpoint` argument, else `pixloc_core/weights/<name>.tar` when the
repository ships one. Checkpoints may carry the alignment's learned dampings, exposed as
`extractor.dampings` ((3, 6), PixLoc order: finest level first), ready for
`FeaturemetricAligner.load_dampings`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .base import Extractor, default_device
from .checkpoint import CheckpointError, load_extractor_state, read_checkpoint, split_model_state
from .classic import ClassicConf, ClassicExtractor
from .intensity import IntensityConf, IntensityExtractor
from .unet import UNetExtractor
from .unet import default_conf as unet_default_conf

logger = logging.getLogger(__name__)

DEFAULT = "classic"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

# UNet variants: name -> config overrides of `unet.default_conf`.
UNETS = {
    "unet-vgg16": {"encoder": "vgg16"},
    "unet-vgg19": {"encoder": "vgg19"},
    "unet-small": {"encoder": "small", "decoder": (16, 16, 16, 16), "output_dim": (16, 16, 16), "max_size": 640},
}
WEIGHT_FREE = {"classic": (ClassicExtractor, ClassicConf), "intensity": (IntensityExtractor, IntensityConf)}


def shipped_weights(name: str) -> Path | None:
    path = WEIGHTS_DIR / f"{name}.tar"
    return path if path.is_file() else None


def available_extractors() -> list[str]:
    """Names that `load_extractor` can build right now without a checkpoint argument."""
    return sorted(WEIGHT_FREE) + sorted(name for name in UNETS if shipped_weights(name))


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
        unknown = set(conf) - set(conf_class.__dataclass_fields__)
        if unknown:
            raise ValueError(f"extractor {name!r}: unknown config keys {sorted(unknown)}")
        extractor = extractor_class(conf_class(**conf))
    elif name in UNETS:
        checkpoint = Path(checkpoint) if checkpoint is not None else shipped_weights(name)
        if checkpoint is None:
            raise ValueError(f"extractor {name!r} needs weights: pass a checkpoint (e.g. PixLoc's "
                             f"checkpoint_best.tar or one written by `pixloc train`)")
        extractor = build_unet(name, **conf)
        extractor_state, dampings = split_model_state(read_checkpoint(checkpoint), checkpoint)
        load_extractor_state(extractor, extractor_state, checkpoint)
        extractor.dampings = dampings
        logger.info("Loaded %s from %s%s", name, checkpoint, " with dampings" if dampings is not None else "")
    else:
        raise ValueError(f"unknown extractor {name!r}, expected one of {sorted(WEIGHT_FREE) + sorted(UNETS)}")
    return extractor.eval().to(default_device())


__all__ = ["DEFAULT", "CheckpointError", "Extractor", "available_extractors", "build_unet", "load_extractor"]
