"""SAR normalisation: linear pixel values -> [0, 1] amplitude images the model learns.

Every method works on amplitude: with ``cfg.input == "intensity"`` pixels are square-rooted
first, so the model always sees amplitude images whatever the files hold. Statistics are
per image, i.e. per scene (the reference study normalises each scene on its own).

A constant image never divides by zero: where a method's scale is undefined (an all-zero
image, or `percentile` with equal clip bounds) the result is all zeros; otherwise the
formula's own value (`reference` maps a constant c > 0 to 1, since std = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sar_ray.config import NormalizationConfig
from sar_ray.data.captions import DataError


def _amplitude(pixels: np.ndarray, cfg: NormalizationConfig) -> np.ndarray:
    x = np.asarray(pixels, dtype=np.float64)
    if cfg.input == "intensity":
        # Intensity |s|^2 is >= 0 physically; negatives are calibration noise around 0.
        x = np.sqrt(np.maximum(x, 0.0))
    return x


def _reference(pixels: np.ndarray, cfg: NormalizationConfig) -> np.ndarray:
    a = _amplitude(pixels, cfg)
    scale = a.mean() + cfg.k * a.std()
    if not scale > 0:
        return np.zeros(a.shape, np.float32)
    return np.clip(a / scale, 0.0, 1.0).astype(np.float32)


def _db(pixels: np.ndarray, cfg: NormalizationConfig) -> np.ndarray:
    a = _amplitude(pixels, cfg)
    # 20*log10(A) == 10*log10(I); zeros and negatives become -inf dB and clip to db_min.
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 20.0 * np.log10(np.maximum(a, 0.0))
    db = np.nan_to_num(db, nan=cfg.db_min, neginf=cfg.db_min)
    return ((np.clip(db, cfg.db_min, cfg.db_max) - cfg.db_min) / (cfg.db_max - cfg.db_min)).astype(
        np.float32
    )


def _percentile(pixels: np.ndarray, cfg: NormalizationConfig) -> np.ndarray:
    a = _amplitude(pixels, cfg)
    lo, hi = np.percentile(a, [cfg.p_low, cfg.p_high])
    if not hi > lo:
        return np.zeros(a.shape, np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


class DepthError(DataError):
    """An image that contradicts `data.normalization.bits`: a config mistake, never skipped as
    a corrupt image (`data.on_corrupt=skip` would drop the brightest scenes of a set)."""


def check_depth(pixels: np.ndarray, bits: int | None, cfg: NormalizationConfig, name: str = "") -> None:
    """Raise :class:`DepthError` where `cfg.bits` (``method: none``) does not fit the image: a
    file storing fewer bits or floats (dividing those by 2**bits - 1 would be as wrong as the
    16x it fixes), or a pixel above the declared full scale."""
    if cfg.method != "none" or cfg.bits is None:
        return
    where, fix = name or "an image", f"data.normalization.bits={cfg.bits} declares {cfg.bits}-bit samples"
    if bits is None or bits < cfg.bits:
        stored = "float (or signed / wide integer)" if bits is None else f"{bits}-bit"
        raise DepthError(f"{where}: stores {stored} samples but {fix}; it applies to integer samples stored in "
                         f"more bits (12-bit counts in 16-bit words): remove it or convert this file")
    top = float(2**cfg.bits - 1)
    vmax = float(np.max(pixels)) if np.size(pixels) else 0.0
    if vmax > top:
        need = int(np.ceil(np.log2(vmax + 1)))
        raise DepthError(f"{where}: a pixel of {vmax:g} is above the full scale {top:g} that {fix}; set it to the "
                         f"samples' depth (at least {need}) or leave it out to use the depth the file records")


def _none(pixels: np.ndarray, cfg: NormalizationConfig, bits: int | None = None, name: str = "") -> np.ndarray:
    x = np.asarray(pixels)
    if cfg.bits is not None:  # the user's word for the samples' depth
        check_depth(x, bits, cfg, name)
        top = float(2**cfg.bits - 1)
    elif bits is not None:
        top = float(2**bits - 1)  # the file's own range: a dark 16-bit image stays dark
    elif np.issubdtype(x.dtype, np.integer):
        top = float(np.iinfo(x.dtype).max)
    else:
        # Floats of unknown storage (an array, not a file `io.read_pixels` read): guess the
        # range. Whole numbers up to 255 are 8-bit, up to 65535 16-bit. Floats already in
        # [0, 1] stay as they are (generated samples); others / max.
        x = x.astype(np.float64)
        vmin, vmax = float(x.min()), float(x.max())
        whole = vmin >= 0 and bool(np.all(x == np.round(x)))
        if whole and vmax <= 255 and vmax > 1:
            top = 255.0
        elif whole and 255 < vmax <= 65535:
            top = 65535.0
        elif vmin >= 0 and vmax <= 1:
            top = 1.0
        else:
            top = vmax
    if not top > 0:
        return np.zeros(x.shape, np.float32)
    scaled = np.asarray(x, dtype=np.float64) / top
    if cfg.input == "intensity":
        scaled = np.sqrt(np.maximum(scaled, 0.0))
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


NORMALIZERS: dict[str, Callable[[np.ndarray, NormalizationConfig], np.ndarray]] = {
    "reference": _reference,
    "db": _db,
    "percentile": _percentile,
    "none": _none,
}


def normalize(pixels: np.ndarray, cfg: NormalizationConfig, bits: int | None = None, name: str = "") -> np.ndarray:
    """(H, W) linear pixel values -> (H, W) float32 in [0, 1] by ``cfg.method``.

    `bits` is the depth the file stored its samples with (`io.read_pixels`: 8, 16, a TIFF's
    BitsPerSample, or None); ``none`` divides by its full scale (255, 65535) instead of guessing
    it from the values, or by ``2**cfg.bits - 1`` where the config declares the depth (an image
    that contradicts it raises :class:`DepthError`; `name` says which image)."""
    try:
        fn = NORMALIZERS[cfg.method]
    except KeyError:
        raise ValueError(
            f"unknown normalization method {cfg.method!r}; valid: {', '.join(NORMALIZERS)}"
        ) from None
    return _none(pixels, cfg, bits, name) if fn is _none else fn(pixels, cfg)


def to_model_range(img01: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1] float32 (the VAE's input range)."""
    return (np.asarray(img01, dtype=np.float32) * 2.0 - 1.0).astype(np.float32)


def to_three_channels(img: np.ndarray) -> np.ndarray:
    """(H, W) grayscale -> (3, H, W), the same values in each channel (the VAE expects RGB)."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a (H, W) grayscale image, got shape {tuple(img.shape)}")
    return np.repeat(img[None], 3, axis=0)
