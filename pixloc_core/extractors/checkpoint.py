"""Reading and writing checkpoints in PixLoc's `checkpoint_best.tar` layout.

A checkpoint is a `torch.save` dict whose "model" entry is the state dict of PixLoc's
TwoViewRefiner:

    extractor.encoder.* / extractor.decoder.* / extractor.adaptation.* / extractor.uncertainty.*
    optimizer.{0,1,2}.dampingnet.const   (6,) per level, index 0 = the FINEST level

`dampings` below are (3, 6) in that same PixLoc order (row 0 the finest level), the order that
`FeaturemetricAligner.load_dampings` takes and flips into our coarse-to-fine pyramids.
Checkpoints written by `pixloc train` add "conf" (the extractor name and config), "step", and
the training state under "train" (resumption).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .base import STRIDES

logger = logging.getLogger(__name__)

EXTRACTOR_PREFIX = "extractor."
DAMPING_KEY = "optimizer.{}.dampingnet.const"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file and the reason in the message."""


def _damping_keys() -> list[str]:
    """Checkpoint keys of the dampings, finest level first."""
    return [DAMPING_KEY.format(index) for index in range(len(STRIDES))]


def _safe_load(path: Path, what: str):
    """torch.load with weights_only=True; a missing or unreadable file raises a one-line
    CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    numpy_types = [np.dtype, np.ndarray, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
                   np._core.multiarray.scalar, np._core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(numpy_types):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a loadable torch {what} with weights_only=True ({reason})"
                              ) from error


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict file (ALIKE's .pth, the converted XFeat weights)."""
    path = Path(path)
    state = _safe_load(path, "weights file")
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def is_training_checkpoint(path: Path) -> bool:
    """Whether the file is in PixLoc's checkpoint layout (as `pixloc train` writes), not a plain
    state dict; a missing or unreadable file raises the one-line CheckpointError."""
    content = _safe_load(Path(path), "weights file")
    return isinstance(content, dict) and isinstance(content.get("model"), dict)


def read_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True (no code execution) and a check of the layout.

    Official PixLoc checkpoints also hold metrics as numpy scalars; those numpy types are
    allow-listed, nothing else is.
    """
    path = Path(path)
    checkpoint = _safe_load(path, "checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (PixLoc checkpoint layout)")
    return checkpoint


def split_model_state(checkpoint: dict, path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """"model" state dict -> (extractor state dict without prefix, dampings (3, 6) finest first or None)."""
    state = checkpoint["model"]
    extractor_state = {key[len(EXTRACTOR_PREFIX):]: value for key, value in state.items()
                       if key.startswith(EXTRACTOR_PREFIX)}
    if not extractor_state:
        keys = ", ".join(list(state)[:5]) or "none"
        raise CheckpointError(f"{path}: no '{EXTRACTOR_PREFIX}*' keys in the model state dict (found: {keys})")
    keys = _damping_keys()
    present = [key in state for key in keys]
    if not any(present):
        return extractor_state, None
    if not all(present):
        missing = [key for key, found in zip(keys, present) if not found]
        raise CheckpointError(f"{path}: incomplete dampings, missing {missing}")
    dampings = torch.stack([state[key].float().reshape(-1) for key in keys])
    if dampings.shape != (len(STRIDES), 6):
        raise CheckpointError(f"{path}: dampings must be 6 values per level, got {tuple(dampings.shape)}")
    return extractor_state, dampings


def load_extractor_state(extractor: torch.nn.Module, extractor_state: dict[str, torch.Tensor], path: Path,
                         prefix: str = EXTRACTOR_PREFIX) -> None:
    """Strict load with an error that lists what does not match, instead of torch's wall of text.
    `prefix` is how the file names the keys (PixLoc checkpoints: "extractor.", plain state dicts: "")."""
    expected = extractor.state_dict()
    missing = sorted(set(expected) - set(extractor_state))
    unexpected = sorted(set(extractor_state) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(extractor_state)
                        if expected[key].shape != extractor_state[key].shape)
    if missing or unexpected or mismatched:
        def listing(keys: list[str]) -> str:
            shown = [prefix + key for key in keys[:6]]
            return ", ".join(shown) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = [f"{label} keys: {listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        raise CheckpointError(f"{path}: checkpoint does not fit {getattr(extractor, 'name', 'the model')}; "
                              + "; ".join(parts))
    extractor.load_state_dict(extractor_state)


def _finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def write_checkpoint(path: Path, extractor: torch.nn.Module, dampings: torch.Tensor | None,
                     conf: dict, step: int = 0, train_state: dict | None = None) -> None:
    """Atomically write a PixLoc-layout checkpoint; refuses non-finite weights.

    dampings: (3, 6) raw damping parameters, finest level first (PixLoc order).
    """
    path = Path(path)
    state = {EXTRACTOR_PREFIX + key: value.detach().cpu() for key, value in extractor.state_dict().items()}
    if dampings is not None:
        for key, row in zip(_damping_keys(), dampings.detach().cpu()):
            state[key] = row.clone()
    if not _finite(state.values()):
        raise CheckpointError(f"{path}: refusing to write a checkpoint with non-finite weights")
    checkpoint = {"model": state, "conf": conf, "step": step}
    if train_state is not None:
        checkpoint["train"] = train_state
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
    logger.info("Wrote checkpoint %s (step %d)", path, step)
