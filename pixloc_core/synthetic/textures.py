"""Procedural, anti-aliased surface textures evaluated at ray hits.

Textures are functions of metric surface coordinates, so a surface looks the same from every
view. Aliasing is avoided by band-limiting instead of supersampling: each detail layer knows the
pixel footprint on the surface (metres per pixel along each texture axis) and
* value-noise octaves fade out before their period drops below ~2 pixels,
* stripes, mortar lines, window edges are box-filtered analytically over the footprint,
* per-cell random variations (bricks, panels, windows, tiles) fade out as their cells shrink.
"""
from __future__ import annotations

import numpy as np

from .scene import GROUND_SHADE, STYLE_BRICK, STYLE_PANELS, Faces, Scene

_MIN_FOOTPRINT = 1e-4  # metres; keeps the box filters defined for very close surfaces
BRICK_LENGTH, BRICK_HEIGHT, MORTAR = 0.24, 0.075, 0.012  # metres


_HASH_X, _HASH_Y, _HASH_SEED = np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F)


def _lattice_index(x: np.ndarray) -> np.ndarray:
    """Integer-valued floats to uint32 (wrapping negatives), the input of the hash."""
    return x.astype(np.int32).view(np.uint32)


def _mix(h: np.ndarray) -> np.ndarray:
    """Avalanche a uint32 array in place and map it to floats in [0, 1)."""
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h * (1.0 / 2**32)


def hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: np.ndarray | int) -> np.ndarray:
    """A stateless hash of integer-valued lattice cells (ix, iy) to uniform values in [0, 1)."""
    seed_term = np.asarray(seed, dtype=np.uint32) * _HASH_SEED
    return _mix(_lattice_index(ix) * _HASH_X ^ _lattice_index(iy) * _HASH_Y ^ seed_term)


def value_noise(x: np.ndarray, y: np.ndarray, seed: np.ndarray | int) -> np.ndarray:
    """Smoothly interpolated lattice noise with unit cell size, values in [0, 1)."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    hx = _lattice_index(x0) * _HASH_X
    hy = _lattice_index(y0) * _HASH_Y ^ np.asarray(seed, dtype=np.uint32) * _HASH_SEED
    hy_next = (_lattice_index(y0 + 1) * _HASH_Y) ^ np.asarray(seed, dtype=np.uint32) * _HASH_SEED
    n00, n10 = _mix(hx ^ hy), _mix((hx + _HASH_X) ^ hy)
    n01, n11 = _mix(hx ^ hy_next), _mix((hx + _HASH_X) ^ hy_next)
    bottom = n00 + fx * (n10 - n00)
    top = n01 + fx * (n11 - n01)
    return bottom + fy * (top - bottom)


def detail_fade(footprint: np.ndarray, period: float | np.ndarray) -> np.ndarray:
    """1 while a feature of this period spans >= 4 pixels, 0 once it spans <= 2 pixels."""
    return np.clip(2.0 - 4.0 * footprint / period, 0.0, 1.0)


def fbm(x: np.ndarray, y: np.ndarray, seed: np.ndarray | int, footprint: np.ndarray,
        period: float, octaves: int, gain: float = 0.65) -> np.ndarray:
    """Band-limited fractal noise, zero mean, roughly in [-0.5, 0.5]; octaves halve the period."""
    total = np.zeros_like(x)
    norm = sum(gain ** k for k in range(octaves))
    for k in range(octaves):
        weight = detail_fade(footprint, period)
        if not weight.any():
            break  # finer octaves are invisible too
        octave_seed = np.asarray(seed, dtype=np.uint32) + np.uint32(7919 * (k + 1))
        total += (gain ** k / norm) * weight * (value_noise(x / period, y / period, octave_seed) - 0.5)
        period /= 2
    return total


def _pulse_integral(x: np.ndarray, period: np.ndarray | float, width: np.ndarray | float) -> np.ndarray:
    """Integral from 0 to x of the pulse train that is 1 on [k*period, k*period + width)."""
    cycles = np.floor(x / period)
    return cycles * width + np.clip(x - cycles * period, 0.0, width)


def pulse(x: np.ndarray, period, width, footprint: np.ndarray) -> np.ndarray:
    """The pulse train box-filtered over [x - footprint/2, x + footprint/2]: coverage in [0, 1]."""
    footprint = np.maximum(footprint, _MIN_FOOTPRINT)
    return (_pulse_integral(x + footprint / 2, period, width) - _pulse_integral(x - footprint / 2, period, width)) / footprint


def box(x: np.ndarray, start, end, footprint: np.ndarray) -> np.ndarray:
    """The indicator of [start, end) box-filtered over the footprint."""
    footprint = np.maximum(footprint, _MIN_FOOTPRINT)
    lo, hi = x - footprint / 2, x + footprint / 2
    return np.clip(np.minimum(hi, end) - np.maximum(lo, start), 0.0, None) / footprint


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


def _brick_pattern(faces: Faces, face_index, color, s, r, footprint_s, footprint_r) -> np.ndarray:
    """Running-bond bricks with per-brick shade and filtered mortar joints."""
    course = np.floor(r / BRICK_HEIGHT)
    s_bond = s + 0.5 * BRICK_LENGTH * (course % 2)
    brick = hash_uniform(np.floor(s_bond / BRICK_LENGTH), course, faces.seed[face_index])
    variation = (brick - 0.5) * detail_fade(np.maximum(footprint_s, footprint_r), BRICK_HEIGHT)
    mortar = np.maximum(pulse(r, BRICK_HEIGHT, MORTAR, footprint_r), pulse(s_bond, BRICK_LENGTH, MORTAR, footprint_s))
    bricks = color * (1.0 + 0.35 * variation)[:, None]
    return _lerp(bricks, np.full_like(bricks, 0.72), mortar)


def _panel_pattern(faces: Faces, face_index, color, s, r, footprint_s, footprint_r) -> np.ndarray:
    """Cladding panels with per-panel shade and dark filtered seams."""
    width, height = faces.panel_size[face_index].T
    panel = hash_uniform(np.floor(s / width), np.floor(r / height), faces.seed[face_index] + np.uint32(3))
    variation = (panel - 0.5) * detail_fade(np.maximum(footprint_s, footprint_r), np.minimum(width, height))
    seams = np.maximum(pulse(s, width, 0.025, footprint_s), pulse(r, height, 0.025, footprint_r))
    clad = color * (1.0 + 0.3 * variation)[:, None]
    return _lerp(clad, clad * 0.35, seams)


def shade_facades(faces: Faces, face_index: np.ndarray, s: np.ndarray, r: np.ndarray,
                  footprint_s: np.ndarray, footprint_r: np.ndarray) -> np.ndarray:
    """Colours (N, 3) of N facade hits at (s, r) metres on faces `face_index` (N,)."""
    seed = faces.seed[face_index]
    footprint = np.maximum(footprint_s, footprint_r)
    color = faces.color[face_index].copy()

    tint = fbm(s, r, seed + np.uint32(101), footprint, period=6.0, octaves=2)
    color *= 1.0 + np.stack([0.3 * tint, 0.05 * tint, -0.3 * tint], axis=-1)

    for style, pattern in ((STYLE_BRICK, _brick_pattern), (STYLE_PANELS, _panel_pattern)):
        selected = faces.style[face_index] == style
        if selected.any():
            color[selected] = pattern(faces, face_index[selected], color[selected], s[selected], r[selected],
                                      footprint_s[selected], footprint_r[selected])

    # Cornice band just under each floor line, above the ground floor.
    floor_h = faces.floor_height[face_index]
    cornice = pulse(r - floor_h + 0.25, floor_h, 0.25, footprint_r) * box(r, floor_h + 0.5, np.inf, footprint_r)
    color = _lerp(color, np.minimum(color * 1.35 + 0.08, 1.0), cornice)

    color = _shade_windows(faces, face_index, s, r, footprint_s, footprint_r, color)
    return _weathered(color, s, r, seed, footprint) * faces.shade[face_index, None]


def _weathered(color: np.ndarray, x: np.ndarray, y: np.ndarray, seed, footprint: np.ndarray) -> np.ndarray:
    """Stains (4 m to 25 cm) and grain (25 cm to 1.5 cm): gradients at every scale."""
    stains = fbm(x, y, seed, footprint, period=4.0, octaves=4, gain=0.6)
    grain = fbm(x, y, np.asarray(seed, dtype=np.uint32) + np.uint32(55), footprint, period=0.25, octaves=5, gain=0.9)
    return color * (1.0 + 0.8 * stains + 0.7 * grain)[:, None] + 0.1 * grain[:, None]


def _shade_windows(faces: Faces, face_index, s, r, footprint_s, footprint_r, color) -> np.ndarray:
    """Framed upper-floor windows with a mullion, and wide shop windows on the ground floor."""
    seed = faces.seed[face_index] + np.uint32(17)
    floor_h = faces.floor_height[face_index]
    bay = faces.bay_width[face_index]
    win_w, win_h = faces.window_size[face_index].T
    s_rel = s - faces.window_offset[face_index]
    sill = 0.5 * (floor_h - win_h)
    frame = 0.08
    below_roof = box(r, floor_h, faces.height[face_index] - 0.6, footprint_r)

    column = pulse(s_rel, bay, win_w, footprint_s)
    framed_column = pulse(s_rel + frame, bay, win_w + 2 * frame, footprint_s)
    row = pulse(r - sill, floor_h, win_h, footprint_r)
    framed_row = pulse(r - sill + frame, floor_h, win_h + 2 * frame, footprint_r)
    glass = column * row * below_roof
    frame_cover = np.clip(framed_column * framed_row * below_roof - glass, 0.0, 1.0)
    mullion = pulse(s_rel - win_w / 2 + 0.03, bay, 0.06, footprint_s) * glass

    shop = pulse(s_rel + 0.3 * bay, bay, 0.85 * bay, footprint_s) * box(r, 0.35, 0.75 * floor_h, footprint_r)

    cell_s, cell_r = np.floor(s_rel / bay), np.floor(r / floor_h)
    cell = hash_uniform(cell_s, cell_r, seed)
    fade = detail_fade(np.maximum(footprint_s, footprint_r), win_w)
    # Glass brightness varies per window (reflections, curtains), with a vertical gradient inside.
    in_window = np.clip((r - sill - cell_r * floor_h) / win_h, 0.0, 1.0)
    glass_value = 0.12 + (0.25 * (cell - 0.5) * fade) + 0.15 * in_window
    glass_color = glass_value[:, None] * np.array([0.8, 0.9, 1.1])
    # Goods behind the shop windows: blotches of about 0.5 m.
    goods = fbm(s, r, seed + np.uint32(1), np.maximum(footprint_s, footprint_r), period=0.6, octaves=3, gain=0.8)
    shop_value = 0.25 + 0.3 * (hash_uniform(cell_s, -1 - cell_r, seed) - 0.5) * fade + 0.5 * goods
    shop_color = shop_value[:, None] * np.array([1.0, 0.95, 0.85])
    frame_color = np.full_like(color, 0.85)

    color = _lerp(color, frame_color, frame_cover)
    color = _lerp(color, glass_color, np.clip(glass - mullion, 0.0, 1.0))
    color = _lerp(color, frame_color * 0.8, mullion)
    return _lerp(color, shop_color, shop)


def shade_ground(scene: Scene, x: np.ndarray, y: np.ndarray, footprint_x: np.ndarray, footprint_y: np.ndarray) -> np.ndarray:
    """Colours (N, 3) of N ground hits: asphalt with dashed centre lines, kerbs, paved sidewalks."""
    config = scene.config
    footprint = np.maximum(footprint_x, footprint_y)
    seed = scene.ground_seed

    # Lateral and along-street coordinates relative to the nearest street centre line.
    lateral = np.full_like(x, np.inf)
    along = np.zeros_like(x)
    footprint_lateral = footprint.copy()
    for (x0, y0), (x1, y1) in scene.streets:
        horizontal = y0 == y1
        offset = y - y0 if horizontal else x - x0
        position = x - x0 if horizontal else y - y0
        closer = np.abs(offset) < np.abs(lateral)
        lateral = np.where(closer, offset, lateral)
        along = np.where(closer, position, along)
        footprint_lateral = np.where(closer, footprint_y if horizontal else footprint_x, footprint_lateral)

    asphalt = np.full_like(x, 0.3)
    dashes = pulse(along, 6.0, 3.0, footprint) * box(lateral, -0.08, 0.08, footprint_lateral)
    road = asphalt + (0.85 - asphalt) * dashes

    tile = 0.5
    tiles = hash_uniform(np.floor(x / tile), np.floor(y / tile), seed + 5)
    paving = 0.55 + 0.12 * (tiles - 0.5) * detail_fade(footprint, tile)
    joints = np.maximum(pulse(x, tile, 0.015, footprint_x), pulse(y, tile, 0.015, footprint_y))
    sidewalk = paving * (1.0 - 0.5 * joints)

    half_road = config.road_width / 2
    kerb = box(np.abs(lateral), half_road, half_road + 0.15, footprint_lateral)
    on_sidewalk = box(np.abs(lateral), half_road + 0.15, np.inf, footprint_lateral)
    value = road * (1 - kerb - on_sidewalk) + 0.75 * kerb + sidewalk * on_sidewalk
    color = value[:, None] * np.array([1.0, 0.98, 0.95])
    return _weathered(color, x, y, seed, footprint) * GROUND_SHADE
