"""A seeded street scene or city: a grid of streets lined with box-shaped buildings, in an ENU map frame.

Every surface is a vertical rectangle (a building face) or the ground plane z = 0, so the renderer
can intersect rays analytically. Faces carry the parameters of their procedural texture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geo import EnuOrigin

UP = np.array([0.0, 0.0, 1.0])
# Fixed sun direction (from the south-west, 45 deg high): lambert shading per plane, the same in every view.
SUN = np.array([-0.5, -0.5, np.sqrt(0.5)])
GROUND_SHADE = 0.55 + 0.45 * SUN[2]

STYLE_PLASTER, STYLE_BRICK, STYLE_PANELS = 0, 1, 2


@dataclass(frozen=True)
class SceneConfig:
    seed: int = 0
    origin: tuple[float, float, float] = (47.3769, 8.5417, 408.0)  # WGS84 lat, lon, alt of the map origin
    blocks_x: int = 2  # city blocks between the streets, east-west
    blocks_y: int = 1  # and north-south
    block_size: float = 40.0  # metres
    street_width: float = 14.0  # facade to facade
    road_width: float = 8.0  # asphalt; the rest of the street is sidewalk
    border_depth: float = 30.0  # depth of the ring of buildings that closes the street grid
    building_width: tuple[float, float] = (8.0, 20.0)
    building_height: tuple[float, float] = (8.0, 25.0)
    max_setback: float = 1.0  # facades step back from the street line by up to this much


@dataclass
class Faces:
    """F vertical rectangles: points o + s*axis + r*UP for s in [0, width], r in [0, height]."""
    corner: np.ndarray  # (F, 3) ground corner where s = 0
    axis: np.ndarray  # (F, 3) unit horizontal direction of s, to the right when facing the face
    normal: np.ndarray  # (F, 3) unit outward normal (horizontal)
    width: np.ndarray  # (F,)
    height: np.ndarray  # (F,)
    # Texture parameters, per face.
    seed: np.ndarray  # (F,) uint32
    style: np.ndarray  # (F,) int, STYLE_*
    color: np.ndarray  # (F, 3) base wall colour, sRGB in [0, 1]
    shade: np.ndarray  # (F,) lambert factor
    floor_height: np.ndarray  # (F,)
    bay_width: np.ndarray  # (F,) horizontal period of the windows
    window_size: np.ndarray  # (F, 2) window width, height
    window_offset: np.ndarray  # (F,) s of the first window's left edge
    panel_size: np.ndarray  # (F, 2) cladding panel width, height (panels style)

    def __len__(self) -> int:
        return len(self.width)


@dataclass
class Scene:
    config: SceneConfig
    faces: Faces
    streets: np.ndarray  # (S, 2, 2) street centre-line segments [start xy, end xy]
    extent: np.ndarray  # (2, 2) [min xy, max xy] of the built area
    ground_seed: int

    @property
    def origin(self) -> EnuOrigin:
        return EnuOrigin(*self.config.origin)


def _split(start: float, end: float, widths: tuple[float, float], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Cuts [start, end] into pieces whose widths lie in `widths` (the last piece absorbs the rest)."""
    cuts = [start]
    while end - cuts[-1] > widths[1]:
        cuts.append(cuts[-1] + rng.uniform(*widths))
    if len(cuts) > 1 and end - cuts[-1] < widths[0]:
        cuts.pop()
    return list(zip(cuts, cuts[1:] + [end]))


def _box_faces(x0: float, x1: float, y0: float, y1: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(corner, outward normal, width) of the 4 walls of an axis-aligned box."""
    return [
        (np.array([x0, y0, 0.0]), np.array([0.0, -1.0, 0.0]), x1 - x0),  # south
        (np.array([x1, y0, 0.0]), np.array([1.0, 0.0, 0.0]), y1 - y0),  # east
        (np.array([x1, y1, 0.0]), np.array([0.0, 1.0, 0.0]), x1 - x0),  # north
        (np.array([x0, y1, 0.0]), np.array([-1.0, 0.0, 0.0]), y1 - y0),  # west
    ]


def _building_style(rng: np.random.Generator) -> dict:
    style = rng.choice([STYLE_PLASTER, STYLE_BRICK, STYLE_PANELS], p=[0.45, 0.3, 0.25])
    if style == STYLE_BRICK:
        color = np.array([0.62, 0.33, 0.24]) * rng.uniform(0.75, 1.2) + rng.normal(0, 0.04, 3)
    else:
        channel_offsets = rng.uniform(0, 1, 3)
        color = 0.45 + 0.4 * rng.uniform() + 0.18 * (channel_offsets - channel_offsets.mean())
    floor_height = rng.uniform(3.0, 3.8)
    bay = rng.uniform(2.4, 4.2)
    return dict(
        style=style,
        color=np.clip(color, 0.1, 0.95),
        floor_height=floor_height,
        bay_width=bay,
        window_size=np.array([bay * rng.uniform(0.35, 0.6), floor_height * rng.uniform(0.4, 0.6)]),
        window_offset=rng.uniform(0, bay),
        panel_size=np.array([rng.uniform(0.9, 2.0), rng.uniform(0.6, 1.5)]),
    )


def build_scene(config: SceneConfig = SceneConfig()) -> Scene:
    """The street grid and its buildings; the same config (seed) always gives the same scene."""
    rng = np.random.default_rng([config.seed, 0])
    pitch = config.block_size + config.street_width
    half_street = config.street_width / 2
    size_x, size_y = config.blocks_x * pitch, config.blocks_y * pitch

    streets = [((0.0, j * pitch), (size_x, j * pitch)) for j in range(config.blocks_y + 1)]
    streets += [((i * pitch, 0.0), (i * pitch, size_y)) for i in range(config.blocks_x + 1)]

    # Regions to fill with buildings: the inner blocks and a ring around the grid, so that every
    # street is lined on both sides and its ends are closed.
    lo, hi = -half_street, np.array([size_x, size_y]) + half_street
    depth = config.border_depth
    regions = [
        (lo - depth, hi[0] + depth, lo - depth, lo),
        (lo - depth, hi[0] + depth, hi[1], hi[1] + depth),
        (lo - depth, lo, lo, hi[1]),
        (hi[0], hi[0] + depth, lo, hi[1]),
    ]
    regions += [
        (i * pitch + half_street, (i + 1) * pitch - half_street, j * pitch + half_street, (j + 1) * pitch - half_street)
        for i in range(config.blocks_x) for j in range(config.blocks_y)
    ]

    face_rows = []
    for x0, x1, y0, y1 in regions:
        for bx0, bx1 in _split(x0, x1, config.building_width, rng):
            for by0, by1 in _split(y0, y1, config.building_width, rng):
                setback = rng.uniform(0, config.max_setback, 4)
                box = (bx0 + setback[0], bx1 - setback[1], by0 + setback[2], by1 - setback[3])
                height = rng.uniform(*config.building_height)
                style = _building_style(rng)
                for corner, normal, width in _box_faces(*box):
                    face_rows.append(dict(
                        corner=corner, normal=normal, axis=np.cross(UP, normal), width=width, height=height,
                        seed=rng.integers(0, 2**32, dtype=np.uint32),
                        shade=0.55 + 0.45 * max(0.0, float(normal @ SUN)), **style,
                    ))
    faces = Faces(**{key: np.array([row[key] for row in face_rows]) for key in face_rows[0]})
    return Scene(
        config=config,
        faces=faces,
        streets=np.array(streets, dtype=np.float64),
        extent=np.array([[lo - depth, lo - depth], [hi[0] + depth, hi[1] + depth]]),
        ground_seed=int(rng.integers(0, 2**31)),
    )
