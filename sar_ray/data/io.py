"""Read and write single-channel SAR images as float32 arrays of the stored linear values.

    read_image("scene.tif")         # (H, W) float32, e.g. calibrated amplitude
    read_image("chip.png")          # 16-bit PNG keeps its 0..65535 values

The format is taken from the file's first bytes, not its extension, so a `.png` that is
really a TIFF still reads. Every failure is an :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


class ImageReadError(ValueError):
    """An image that cannot be used; the message names the file and what is wrong."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as (H, W) float32 linear pixel values; RGB(A) -> mean of R, G, B."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{p}: cannot read file ({e.strerror or e})") from None
    return read_image_bytes(data, str(p))


def read_image_bytes(data: bytes | dict, name: str) -> np.ndarray:
    """Like :func:`read_image` for encoded bytes (a Parquet image cell); `name` is for errors.

    Accepts plain bytes or a Hugging Face image struct ``{"bytes": ..., "path": ...}``.
    """
    if isinstance(data, dict):
        data = data.get("bytes")
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    data = bytes(data)
    try:
        if data[:4] in _TIFF_MAGIC:
            arr = _decode_tiff(data)
        else:
            arr = _decode_pil(data)
    except ImageReadError as e:
        raise ImageReadError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{name}: not an image PIL or tifffile can read (unknown format or corrupt header)"
        ) from None
    except Exception as e:  # noqa: BLE001 - decoders raise anything from OSError to struct.error
        raise ImageReadError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return _check(arr, name)


def _decode_pil(data: bytes) -> np.ndarray:
    # PNG IHDR: byte 24 is the bit depth, 25 the colour type (2 RGB, 6 RGBA).
    if data[:8] == _PNG_MAGIC and len(data) > 25 and data[24] == 16 and data[25] in (2, 6):
        # PIL decodes 16-bit colour PNGs to 8 bits per channel: refuse rather than lose bits.
        raise ImageReadError(
            "16-bit colour PNG (PIL keeps only 8 bits of it); save single-channel 16-bit PNG "
            "or a float TIFF"
        )
    with Image.open(io.BytesIO(data)) as im:
        # load() decodes every pixel: a truncated JPEG/PNG fails here, not later in a worker.
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F", "L"):
            return np.asarray(im).astype(np.float32)
        if mode in ("1", "LA", "La"):
            return np.asarray(im.getchannel(0)).astype(np.float32)
        if mode not in ("RGB", "RGBA", "RGBa"):
            # Palette, CMYK, YCbCr, HSV: convert to RGB values first.
            im = im.convert("RGB")
        rgb = np.asarray(im)[..., :3].astype(np.float32)
        return rgb.mean(axis=-1)


def _decode_tiff(data: bytes) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        series = tf.series[0]
        arr = series.asarray()
        axes = series.axes
    if np.iscomplexobj(arr):
        # Single-look complex data: the amplitude |s| is what we model.
        arr = np.abs(arr)
    if arr.ndim == 3 and "S" in axes and arr.shape[axes.index("S")] in (3, 4):
        arr = np.moveaxis(arr, axes.index("S"), -1)[..., :3].astype(np.float32).mean(axis=-1)
    # Drop length-1 page/band axes, but never the image's own (a 1-row image stays 2-D).
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(
            f"TIFF with shape {tuple(arr.shape)} (axes {axes}); expected one 2-D band: "
            "write one band per file"
        )
    return arr.astype(np.float32)


def _check(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(f"{name}: empty image (shape {tuple(arr.shape)})")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ImageReadError(
            f"{name}: {bad} non-finite pixels (NaN/inf) of {arr.size}; replace them (e.g. with 0) "
            "or remove the file"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def write_amplitude_png(path: str | os.PathLike, img01: np.ndarray) -> None:
    """Write a [0, 1] float image as a 16-bit grayscale PNG (values clipped, 0..65535)."""
    arr = np.round(np.clip(np.asarray(img01, dtype=np.float64), 0.0, 1.0) * 65535.0)
    # compress_level=0: speckle does not compress (level 6 saves 2 %) and zlib doubles the time.
    Image.fromarray(arr.astype(np.uint16)).save(Path(path), format="PNG", compress_level=0)


def write_tiff(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a 2-D array as a float32 TIFF (linear values, no scaling)."""
    tifffile.imwrite(Path(path), np.asarray(arr, dtype=np.float32))
