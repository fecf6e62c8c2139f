"""Synthetic SAR scenes: the embedded default dataset, so every path runs with no data on disk.

A scene is a land-cover layout (what is where) turned into a mean backscatter map sigma0
(linear intensity), times multiplicative L-look speckle:

    intensity = sigma0 * Gamma(L, 1/L),   amplitude = sqrt(intensity)

Classes and what they look like (radar looks from the left: range grows with x):
  water   dark (-24 dB) and smooth, mild wind modulation
  fields  medium, flat parcels at different levels, some with row stripes
  forest  K-distributed: a Gamma texture per tree crown under the speckle; shadow behind edges
  urban   building blocks: bright double-bounce line on the near-range wall, layover, dark
          shadow in the street behind, bright point scatterers
  ships / vehicles  bright targets on water / fields with a dark shadow on the far-range side

Captions name the content ("<SAR> image of open water with two ships next to a forest");
the label is one of :data:`LABELS`. Scene i of seed s is the same whatever n is.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sar_ray.config import SynthConfig
from sar_ray.data.io import write_amplitude_png, write_tiff

# Bump when scenes change: cached datasets are keyed by it.
GENERATOR_VERSION = 1

CLASSES = ("water", "fields", "forest", "urban")  # index = value in Layout.classes
LABELS = ("water", "ships", "fields", "vehicles", "forest", "urban")
# 16-bit PNG value 65535 is this linear amplitude: one fixed factor for every scene, so
# amplitude ratios between scenes survive (urban point targets reach ~10).
AMPLITUDE_MAX = 16.0
NOISE_FLOOR = 1e-3  # sigma0 of shadows and the sensor noise (-30 dB)

_SIGMA0 = {"water": 0.004, "fields": 0.05, "forest": 0.15, "urban": 0.06}
_PHRASE = {"water": "open water", "fields": "agricultural fields", "forest": "a forest",
           "urban": "an urban area"}
_COUNT = {1: "a", 2: "two", 3: "three", 4: "four"}
_MARKER = ".sar-ray-synth.json"


@dataclass(frozen=True)
class Layout:
    """What a scene holds before speckle."""

    sigma0: np.ndarray  # (size, size) float32 mean intensity
    classes: np.ndarray  # (size, size) uint8 index into CLASSES (targets not marked)
    caption: str
    label: str


def scene_rng(seed: int, i: int) -> np.random.Generator:
    """The generator of scene i of dataset `seed`: one per scene, so scene i does not depend
    on n or on the order threads write scenes in."""
    return np.random.default_rng([seed % 2**63, i])


def speckle(rng: np.random.Generator, sigma0: np.ndarray, looks: int) -> np.ndarray:
    """Amplitude of L-look fully developed speckle on mean intensity `sigma0` (float32)."""
    gamma = rng.standard_gamma(looks, size=sigma0.shape, dtype=np.float32) / np.float32(looks)
    return np.sqrt(sigma0.astype(np.float32) * gamma)


def generate_scene(rng: np.random.Generator, size: int, looks: int) -> tuple[np.ndarray, str, str]:
    """(amplitude float32 (size, size) linear, caption, label) of one random scene."""
    layout = layout_scene(rng, size)
    return speckle(rng, layout.sigma0, looks), layout.caption, layout.label


def layout_scene(rng: np.random.Generator, size: int) -> Layout:
    """A random land-cover layout and its sigma0 map (draws from `rng` before any speckle)."""
    s = max(size / 128.0, 0.5)  # feature scale: a 128 px scene holds ~ 8 x 8 building blocks
    primary = int(rng.choice(4, p=[0.3, 0.25, 0.2, 0.25]))
    classes = np.full((size, size), primary, np.uint8)
    secondary = None
    if rng.random() < 0.6:
        secondary = int(rng.choice([c for c in range(4) if c != primary]))
        # A smooth random field plus a ramp gives one or two organic blobs or a coastline;
        # thresholding at a quantile keeps the secondary class at 20-45 % of the scene.
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size] / size
        field = _smooth_noise(rng, size, cells=4) + 1.5 * (np.cos(angle) * x + np.sin(angle) * y)
        classes[field > np.quantile(field, rng.uniform(0.55, 0.8))] = secondary

    sigma0 = np.zeros((size, size), np.float32)
    for c in {primary} | ({secondary} if secondary is not None else set()):
        mask = classes == c
        sigma0[mask] = _CLASS_MAPS[CLASSES[c]](rng, size, s)[mask]
    if (classes == CLASSES.index("forest")).any():
        _forest_shadow(sigma0, classes == CLASSES.index("forest"), s)

    target, count = None, 0
    if CLASSES[primary] == "water":
        target, count = "ship", int(rng.choice([0, 1, 2, 3, 4], p=[0.3, 0.3, 0.2, 0.1, 0.1]))
    elif CLASSES[primary] == "fields":
        target, count = "vehicle", int(rng.choice([0, 1, 2, 3], p=[0.5, 0.25, 0.15, 0.1]))
    placed = 0
    for _ in range(count):
        placed += _add_target(rng, sigma0, classes == primary, s, target)

    caption = f"<SAR> image of {_PHRASE[CLASSES[primary]]}"
    if placed:
        caption += f" with {_COUNT[placed]} {target}{'s' if placed > 1 else ''}"
    if secondary is not None:
        caption += f" next to {_PHRASE[CLASSES[secondary]]}"
    label = f"{target}s" if placed else CLASSES[primary]
    np.maximum(sigma0, NOISE_FLOOR, out=sigma0)
    return Layout(sigma0, classes, caption, label)


# --------------------------------------------------------------------------------------------
# class maps: each returns a full (size, size) sigma0 map; the caller keeps its class's pixels
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise smooth over ~size/cells pixels.

    A (cells+2)^2 grid of normal values blended by Gaussian bumps, as two small matrix
    products (scipy.ndimage.zoom costs 10x more and dominated scene time).
    """
    coarse = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    w = _bumps(size, cells)  # (size, cells + 2)
    up = w @ coarse @ w.T
    return (up - up.mean()) / (up.std() + 1e-12)


@functools.lru_cache(maxsize=32)
def _bumps(size: int, cells: int) -> np.ndarray:
    pos = (np.arange(size) + 0.5) / size * cells + 0.5  # pixel centre in grid units
    d = pos[:, None] - np.arange(cells + 2)[None, :]
    w = np.exp(-0.5 * (d / 0.6) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _water(rng, size, s):
    # Wind over water: +-15 % slow modulation, nothing else.
    return _SIGMA0["water"] * (1 + 0.15 * _smooth_noise(rng, size, cells=3)).clip(0.5, 1.5)


def _fields(rng, size, s):
    # Rotated grid of parcels, each at its own level between -17 and -9 dB; a third of them
    # with crop rows (a sinusoid across the parcel).
    theta = rng.uniform(0, np.pi / 2)
    y, x = np.ogrid[0:size, 0:size]
    y, x = y.astype(np.float32), x.astype(np.float32)
    u = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0, 100)
    v = -x * np.sin(theta) + y * np.cos(theta) + rng.uniform(0, 100) + 2 * size
    pw, ph = rng.uniform(14, 40, size=2) * s
    iu, iv = (u // pw).astype(np.int64), (v // ph).astype(np.int64)
    k = 64
    levels = (10 ** rng.uniform(-1.7, -0.9, size=k * k)).astype(np.float32)
    striped = (rng.random(k * k) < 0.35).astype(np.float32)
    pid = (iu % k) * k + iv % k
    period = rng.uniform(3, 6) * s
    rows = 0.6 * np.sin((2 * np.pi / period) * u, dtype=np.float32)
    out = levels[pid] * (1 + striped[pid] * rows)
    # Tracks between parcels: one dark pixel line.
    edge = ((u % pw) < 1) | ((v % ph) < 1)
    return np.where(edge, 0.3 * out, out)


def _forest(rng, size, s):
    # K-distribution = Gamma texture x speckle: a Gamma(nu, 1/nu) value per tree crown,
    # blended over neighbouring crowns so the canopy is not a grid of squares.
    nu = rng.uniform(3, 8)
    cells = max(4, int(size / (2.5 * s)))
    tex = rng.standard_gamma(nu, size=(cells + 2, cells + 2)).astype(np.float32) / nu
    w = _bumps(size, cells)
    tex = w @ tex @ w.T
    return _SIGMA0["forest"] * tex / tex.mean()


def _urban(rng, size, s):
    # Axis-aligned blocks: street | near-range wall (double bounce) | layover | roof.
    bw, bh = (rng.uniform(10, 18, size=2) * s).astype(int) + 4
    street = max(2, int(round(3 * s)))
    ox, oy = rng.integers(0, 64, size=2)
    y, x = np.ogrid[0:size, 0:size]
    cx, lx = np.divmod(x + ox, bw)
    cy, ly = np.divmod(y + oy, bh)
    k = 64
    built = rng.random((k, k)) < 0.8
    roof_level = rng.uniform(0.05, 0.2, size=(k, k))
    here = built[cx % k, cy % k]
    left = built[(cx - 1) % k, cy % k]
    row = ly >= street
    building = here & row & (lx >= street)
    out = np.full((size, size), 0.02, np.float32)  # street: smooth asphalt
    out[building] = roof_level[cx % k, cy % k][building]
    lay = max(1, int(round(2 * s)))
    out[building & (lx < street + lay)] += 0.5  # layover of the wall onto the roof
    out[building & (lx == street)] = rng.uniform(5, 20)  # wall-ground dihedral
    out[~building & row & left & (lx < street)] = NOISE_FLOOR  # radar shadow behind a building
    points = rng.random((size, size)) < 0.004
    out[points] += rng.uniform(5, 40, size=int(points.sum()))
    return out


_CLASS_MAPS = {"water": _water, "fields": _fields, "forest": _forest, "urban": _urban}


def _forest_shadow(sigma0: np.ndarray, forest: np.ndarray, s: float) -> None:
    # Trees cast a shadow onto open ground on their far-range side (+x) and light up the
    # near-range edge; a few pixels wide, like a 15-20 m canopy at sub-metre resolution.
    depth = max(1, int(round(3 * s)))
    behind = np.zeros_like(forest)
    for d in range(1, depth + 1):
        behind[:, d:] |= forest[:, :-d]
    sigma0[behind & ~forest] = NOISE_FLOOR
    edge = forest.copy()
    edge[:, 1:] &= ~forest[:, :-1]
    edge[:, 0] = False
    sigma0[edge] *= 3.0


def _add_target(rng, sigma0, allowed, s, kind) -> int:
    """Draw one ship/vehicle in `allowed` pixels with its far-range shadow; 1 if placed."""
    size = sigma0.shape[0]
    if kind == "ship":
        length = rng.uniform(8, 16) * s
        width = length * rng.uniform(0.2, 0.3)
        level, shadow = rng.uniform(3, 10), 0.5 * length
    else:
        length = rng.uniform(4, 7) * s
        width = length * rng.uniform(0.45, 0.6)
        level, shadow = rng.uniform(2, 6), 1.2 * length
    margin = int(length + shadow) + 1
    inner = allowed[margin:size - margin, margin:size - margin]
    if size <= 2 * margin or not inner.any():
        return 0
    idx = rng.choice(np.flatnonzero(inner))
    cy, cx = np.unravel_index(idx, inner.shape)
    cy, cx = cy + margin, cx + margin
    theta = rng.uniform(0, np.pi)
    half = margin
    y, x = np.mgrid[cy - half:cy + half + 1, cx - half:cx + half + 1]

    def body(dx):
        u = (x - cx - dx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx - dx) * np.sin(theta) + (y - cy) * np.cos(theta)
        return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)

    hull = body(0)
    dark = np.zeros_like(hull)
    for dx in np.linspace(1, shadow, max(2, int(shadow))):
        dark |= body(dx)
    win = sigma0[cy - half:cy + half + 1, cx - half:cx + half + 1]
    win[dark & ~hull] = NOISE_FLOOR
    win[hull] = level
    # A few strong scatterers (superstructure, corners) on the hull.
    hy, hx = np.nonzero(hull)
    pick = rng.choice(len(hy), size=min(3, len(hy)), replace=False)
    win[hy[pick], hx[pick]] = level * rng.uniform(3, 8, size=len(pick))
    return 1


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_synthetic(
    out_dir: str | os.PathLike, n: int, size: int, seed: int = 0, looks: int = 4, fmt: str = "png"
) -> Path:
    """Write n scenes as ``out_dir/<label>/<i>.png`` (or float32 ``.tif``) + metadata.jsonl.

    PNGs hold amplitude / AMPLITUDE_MAX as 16 bits; TIFFs the linear amplitude. The folder
    appears complete or not at all (written to a temporary sibling, then renamed), and a
    folder already written with the same arguments is left as it is.
    """
    if fmt not in ("png", "tiff"):
        raise ValueError(f"fmt must be 'png' or 'tiff' (got {fmt!r})")
    out = Path(out_dir).absolute()
    params = {"version": GENERATOR_VERSION, "n": n, "size": size, "seed": seed, "looks": looks,
              "fmt": fmt}
    if _written_with(out) == params:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        def write_one(i: int) -> dict:
            amp, caption, label = generate_scene(scene_rng(seed, i), size, looks)
            (tmp / label).mkdir(exist_ok=True)
            name = f"{label}/{i:05d}.{'png' if fmt == 'png' else 'tif'}"
            if fmt == "png":
                write_amplitude_png(tmp / name, amp / AMPLITUDE_MAX)
            else:
                write_tiff(tmp / name, amp)
            return {"file_name": name, "text": caption, "label": label}

        # Threads: numpy and the PNG encoder release the GIL; map() keeps row order.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            try:
                rows = list(pool.map(write_one, range(n)))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # Ctrl-C: stop now, not after every scene
                raise
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (tmp / _MARKER).write_text(json.dumps(params))
        _move_into_place(tmp, out, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _written_with(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(tmp: Path, out: Path, params: dict) -> None:
    if out.exists():
        if _written_with(out) is not None:
            # Ours, from other arguments or an older generator: swap it out.
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        elif out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise FileExistsError(
                f"{out}: exists and is not a synthetic dataset; choose another folder"
            )
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process (a parallel trial) finished the same folder first: use theirs.
        if _written_with(out) != params:
            raise


def synthetic_path(cfg: SynthConfig, cache_root: str | os.PathLike = ".sar-ray-cache") -> Path:
    """The cached synthetic dataset for `cfg` (written on first use), as an absolute path."""
    name = f"synthetic-v{GENERATOR_VERSION}-n{cfg.n}-size{cfg.size}-seed{cfg.seed}-looks{cfg.looks}"
    return write_synthetic(Path(cache_root) / name, cfg.n, cfg.size, cfg.seed, cfg.looks)
