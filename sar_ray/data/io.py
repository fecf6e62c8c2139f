"""Read and write single-channel SAR images as float32 arrays of the stored linear values.

    read_image("scene.tif")         # (H, W) float32, e.g. calibrated amplitude
    read_image("chip.png")          # 16-bit PNG keeps its 0..65535 values
    read_image_bytes(npy, "shard-000000.tar:0001.sar.npy")   # complex64 SLC -> amplitude |s|
    pixels, bits = read_pixels("dark.png")   # and the stored depth: 8, 16 (uint8/16; a TIFF's
                                             # BitsPerSample where fewer, e.g. 12) or None

The format is taken from the file's first bytes, not its extension, so a `.png` that is
really a TIFF still reads. NumPy ``.npy`` arrays (a WebDataset member, SARLO-80's SLC) are
loaded without pickle; complex values become the amplitude ``|s|``. Every failure is an
:class:`ImageReadError` naming the file.

The values alone cannot tell a dark 16-bit image (all values <= 255) from an 8-bit one, so
`read_pixels` also returns the stored integer depth; `normalize` uses it for ``method: none``.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".npy")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_NPY_MAGIC = b"\x93NUMPY"
_TAR_MEMBER = re.compile(r"^(.+\.tar)!(.+)@(\d+)\+(\d+)$")  # shard.tar!KEY.member@offset+size


def _read_range(shard: str, member: str, offset: str, size: str) -> bytes:
    from sar_ray.data.storage import filesystem

    fs, p = filesystem(shard)
    try:
        with fs.open_input_file(p) as f:
            f.seek(int(offset))
            data = f.read(int(size))
    except Exception as e:  # noqa: BLE001 - OSError (S3, permissions), FileNotFoundError
        raise ImageReadError(f"{shard}!{member}: cannot read ({' '.join(str(e).split())[:200]})") from None
    if len(data) != int(size):
        raise ImageReadError(f"{shard}!{member}: shard shorter than its index says (rewritten since?)")
    return data


class ImageReadError(ValueError):
    """An image that cannot be used; the message names the file and what is wrong."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as (H, W) float32 linear pixel values; RGB(A) -> mean of R, G, B.

    `path` may name one member of a tar shard, local or in object storage, as
    `webdataset.member_path` writes it (``shard.tar!KEY.sar.npy@OFFSET+SIZE``): a worker reads
    just those bytes, so a list of such paths is small wherever it travels."""
    return read_pixels(path)[0]


def read_image_bytes(data: bytes | dict, name: str) -> np.ndarray:
    """Like :func:`read_image` for encoded bytes (a Parquet image cell); `name` is for errors.

    Accepts plain bytes or a Hugging Face image struct ``{"bytes": ..., "path": ...}``.
    """
    return read_pixels_bytes(data, name)[0]


def read_pixels(path: str | os.PathLike) -> tuple[np.ndarray, int | None]:
    """:func:`read_image` and the stored integer bit depth: 8 or 16 for unsigned 8/16-bit
    samples (PNG, JPEG, TIFF, .npy), None for anything else (floats, SLC amplitude, int32)."""
    member = _TAR_MEMBER.match(str(path))
    if member is not None:
        return read_pixels_bytes(_read_range(*member.groups()), str(path))
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{p}: cannot read file ({e.strerror or e})") from None
    return read_pixels_bytes(data, str(p))


def read_pixels_bytes(data: bytes | dict, name: str) -> tuple[np.ndarray, int | None]:
    """:func:`read_image_bytes` and the stored bit depth (see :func:`read_pixels`)."""
    if isinstance(data, dict):
        data = data.get("bytes")
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    data = bytes(data)
    try:
        if data[:4] in _TIFF_MAGIC:
            arr, bits = _decode_tiff(data)
        elif data[:6] == _NPY_MAGIC:
            arr, bits = _decode_npy(data)
        else:
            arr, bits = _decode_pil(data)
    except ImageReadError as e:
        raise ImageReadError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{name}: not an image PIL or tifffile can read (unknown format or corrupt header)"
        ) from None
    except Exception as e:  # noqa: BLE001 - decoders raise anything from OSError to struct.error
        raise ImageReadError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return _check(arr, name), bits


def probe_image_bytes(data: bytes) -> tuple[tuple[int, ...], str]:
    """(shape, stored dtype) of an encoded image from its first bytes, without decoding the
    pixels: ``((1024, 1024), "complex64")`` for an SLC .npy, ``((512, 512), "uint16")`` for a
    16-bit PNG. Raises :class:`ImageReadError` when the bytes are no image header."""
    data = bytes(data)
    if data[:6] == _NPY_MAGIC:
        shape, dtype = npy_header(data)
        return tuple(shape), str(dtype)
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
            mode = im.mode
    except Exception as e:  # noqa: BLE001 - truncated or unknown header
        raise ImageReadError(f"not an image header PIL can read ({type(e).__name__})") from None
    dtype = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32", "F": "float32"}.get(mode, "uint8")
    bands = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode)
    return ((h, w, bands) if bands else (h, w)), dtype


def _decode_pil(data: bytes) -> tuple[np.ndarray, int | None]:
    # PNG IHDR: byte 24 is the bit depth, 25 the colour type (2 RGB, 4 grey + alpha, 6 RGBA).
    if data[:8] == _PNG_MAGIC and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6):
        # PIL decodes these to 8 bits per channel (a dark one to zeros): refuse rather than lose bits.
        kind = "grey + alpha" if data[25] == 4 else "colour"
        raise ImageReadError(
            f"16-bit {kind} PNG (PIL keeps only 8 bits of it); save single-channel 16-bit PNG "
            "or a float TIFF"
        )
    with Image.open(io.BytesIO(data)) as im:
        # load() decodes every pixel: a truncated JPEG/PNG fails here, not later in a worker.
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F", "L"):
            return _values(np.asarray(im))
        if mode in ("1", "LA", "La"):
            return _values(np.asarray(im.getchannel(0)))
        if mode not in ("RGB", "RGBA", "RGBa"):
            # Palette, CMYK, YCbCr, HSV: convert to RGB values first.
            im = im.convert("RGB")
        rgb = np.asarray(im)[..., :3]
        return rgb.astype(np.float32).mean(axis=-1), _bits(rgb)


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an ``.npy`` file from its first bytes (the header is < 4 KiB); raises
    :class:`ImageReadError` when it is not a usable single-band image (see `check_npy`)."""
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:  # noqa: BLE001 - ValueError for a bad magic or header
        raise ImageReadError(f"not a readable .npy array ({e})") from None
    return check_npy(tuple(shape), np.dtype(dtype)), np.dtype(dtype)


def check_npy(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """The (H, W) an array of `shape`, `dtype` gives, or :class:`ImageReadError` saying why
    it is no SAR image: complex (SLC) or real numbers, one 2-D band (length-1 axes dropped)."""
    if dtype.fields is not None and len(dtype.fields) == 2:
        # CInt16-style (re, im) records, as some SLC products store them.
        raise ImageReadError(
            f"complex samples stored as a record dtype {dtype} ({dtype.itemsize} bytes); save "
            "them as numpy complex64 (H, W), e.g. (a['re'] + 1j * a['im']).astype(np.complex64)"
        )
    ok = dtype.kind in "fiu" or dtype in (np.complex64, np.complex128)
    if not ok:
        raise ImageReadError(
            f"array dtype {dtype}; expected complex64 (SLC, read as |s|) or real amplitude / "
            "intensity numbers"
        )
    band = tuple(n for n in shape if n != 1) if len(shape) > 2 else shape
    if len(band) != 2:
        hint = ""
        if dtype.kind in "fiu" and 2 in (shape[0], shape[-1]) and len(shape) == 3:
            hint = " (real and imaginary parts on their own axis? store them as complex64 (H, W))"
        raise ImageReadError(f"array of shape {tuple(shape)}; expected one 2-D band (H, W){hint}")
    return band


def _decode_npy(data: bytes) -> tuple[np.ndarray, int | None]:
    shape, _ = npy_header(data)
    # allow_pickle=False: an object array cannot run code (npy_header refused it already).
    arr = np.load(io.BytesIO(data), allow_pickle=False).reshape(shape)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)  # single-look complex: the amplitude |s| is what we model
    return _values(arr)


def _decode_tiff(data: bytes) -> tuple[np.ndarray, int | None]:
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        series = tf.series[0]
        arr = series.asarray()
        axes = series.axes
        rgb = tf.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        declared = tf.pages[0].bitspersample  # 12 for 12-bit samples in 16-bit words
    if np.iscomplexobj(arr):
        # Single-look complex data: the amplitude |s| is what we model.
        arr = np.abs(arr)
    bits = _bits(arr)  # a colour mean keeps its bands' depth
    if bits is not None and isinstance(declared, int) and 0 < declared < bits:
        bits = declared  # its full scale is 2**12 - 1, not 65535
    if arr.ndim == 3 and "S" in axes and arr.shape[axes.index("S")] in (3, 4):
        bands = arr.shape[axes.index("S")]
        if not (rgb and arr.dtype in (np.uint8, np.uint16)):
            # An 8/16-bit colour picture is averaged to grey; float or complex bands are channels
            # (polarisations, looks): their mean, without the 4th, would be a silent wrong image.
            raise ImageReadError(f"TIFF of {bands} {arr.dtype} bands (axes {axes}), e.g. polarisations; "
                                 "expected one band: write one band per file")
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
    return arr.astype(np.float32), bits


def _bits(arr: np.ndarray) -> int | None:
    """8 or 16 for unsigned 8/16-bit samples, else None (floats, signed or wider integers)."""
    return {1: 8, 2: 16}.get(arr.dtype.itemsize) if arr.dtype.kind == "u" else None


def _values(arr: np.ndarray) -> tuple[np.ndarray, int | None]:
    """float32 values (exact for <= 24-bit integers) and the depth they were stored with."""
    return arr.astype(np.float32), _bits(arr)


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
