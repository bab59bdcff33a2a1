"""One-off conversion of XFeat's ONNX export into the torch state dict that `xfeat.py` loads.

    python -m pixloc_core.extractors.convert_xfeat \
        --onnx ../shared/weights/xfeat/xfeat_lighterglue.onnx --out pixloc_core/weights/xfeat/xfeat.pt

Needs the `onnx` package (only here: the runtime reads the .pt file). The export's initializers
are named `extractor.net.<module>.weight` and, for the convolutions with folded batch norm,
`extractor.net.<module>.weight_bias`; the LighterGlue matcher's initializers are left out.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import torch

from .xfeat import XFeatExtractor

logger = logging.getLogger(__name__)

ONNX_PREFIX = "extractor.net."
FOLDED_BIAS_SUFFIX = ".weight_bias"


def convert(onnx_path: Path, out: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    state = {}
    for initializer in onnx.load(str(onnx_path)).graph.initializer:
        if not initializer.name.startswith(ONNX_PREFIX):
            continue
        key = initializer.name[len(ONNX_PREFIX):]
        if key.endswith(FOLDED_BIAS_SUFFIX):
            key = key[:-len(FOLDED_BIAS_SUFFIX)] + ".bias"
        state[key] = torch.from_numpy(numpy_helper.to_array(initializer).copy())
    expected = XFeatExtractor().state_dict()
    if set(state) != set(expected) or any(state[key].shape != expected[key].shape for key in expected):
        raise ValueError(f"{onnx_path}: initializers do not fit the XFeat network: missing "
                         f"{sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(sorted(state.items())), out)
    logger.info("Wrote %s (%d tensors, sha256 of the source %s)", out, len(state),
                hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    convert(args.onnx, args.out)


if __name__ == "__main__":
    main()
