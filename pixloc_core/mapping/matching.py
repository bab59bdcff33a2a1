"""Descriptor matching in torch (SIFT's and the learned types'): nearest neighbour, Lowe's ratio test, optional mutual check.

A chunked matmul replaces pycolmap's CPU matcher (about 10x faster on CPU for the same result) and
bounds memory: only a (chunk_size, M) similarity block exists at any time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .sift import Features

default_conf = {
    "ratio_threshold": 0.8,
    "mutual": True,
    "chunk_size": 2048,
}


def normalize_descriptors(descriptors: np.ndarray) -> torch.Tensor:
    """(N, D) uint8 or float -> (N, D) float32 unit vectors."""
    return torch.nn.functional.normalize(torch.from_numpy(np.asarray(descriptors, dtype=np.float32)), dim=-1)


@torch.no_grad()
def match_descriptors(desc0: torch.Tensor, desc1: torch.Tensor, ratio_threshold: float = 0.8,
                      mutual: bool = True, chunk_size: int = 2048) -> np.ndarray:
    """desc0: (N, D), desc1: (M, D), unit-norm. Returns (K, 2) int64 index pairs (i in 0, j in 1)."""
    if len(desc0) == 0 or len(desc1) < 2:
        return np.empty((0, 2), dtype=np.int64)
    top_sim, nn01 = [], []  # per row of desc0: the two best similarities, the best index
    for start in range(0, len(desc0), chunk_size):
        chunk_sim, chunk_index = (desc0[start:start + chunk_size] @ desc1.T).topk(2, dim=1)  # (C, 2)
        top_sim.append(chunk_sim)
        nn01.append(chunk_index[:, 0])
    top_sim, nn01 = torch.cat(top_sim), torch.cat(nn01)  # (N, 2), (N,)
    # On unit vectors the squared L2 distance is 2 - 2 cos; the ratio test is on distances.
    distances = (2 - 2 * top_sim).clamp(min=0).sqrt()
    rows = torch.nonzero(distances[:, 0] < ratio_threshold * distances[:, 1])[:, 0]
    if mutual:
        # Only the rows that pass the ratio test need the reverse nearest neighbour of their match.
        candidates, inverse = torch.unique(nn01[rows], return_inverse=True)
        nn10 = torch.cat([(desc1[candidates[start:start + chunk_size]] @ desc0.T).argmax(dim=1)
                          for start in range(0, len(candidates), chunk_size)] or [rows])
        rows = rows[nn10[inverse] == rows]
    return torch.stack([rows, nn01[rows]], dim=1).numpy()


def main(features: dict[str, Features], pairs: list[tuple[str, str]], conf: dict | None = None
         ) -> dict[tuple[str, str], np.ndarray]:
    """Match every pair; returns {(name0, name1): (K, 2) keypoint index pairs}."""
    conf = {**default_conf, **(conf or {})}
    normalized = {}  # computed lazily: each image appears in many pairs

    def descriptors(name: str) -> torch.Tensor:
        if name not in normalized:
            normalized[name] = normalize_descriptors(features[name].descriptors)
        return normalized[name]

    return {(name0, name1): match_descriptors(descriptors(name0), descriptors(name1), **conf)
            for name0, name1 in tqdm(pairs, desc="matching", unit="pair")}


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    """hloc/COLMAP pairs file: one `name0 name1` per line."""
    Path(path).write_text("".join(f"{name0} {name1}\n" for name0, name1 in pairs))
