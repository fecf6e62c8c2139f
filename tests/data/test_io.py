"""The image reader: exact linear values for every format, one clear error for bad files."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from sar_ray.data import ImageReadError, read_image, read_image_bytes, read_pixels, write_amplitude_png, write_tiff


def test_png_8_and_16_bit_round_trip_exactly(tmp_path):
    a8 = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    Image.fromarray(a8).save(tmp_path / "a8.png")
    assert np.array_equal(read_image(tmp_path / "a8.png"), a8.astype(np.float32))

    # 16-bit values above 255 must survive (not squashed to 8 bits).
    a16 = (np.arange(40 * 30) * 54).astype(np.uint16).reshape(40, 30)
    assert a16.max() > 60000
    Image.fromarray(a16).save(tmp_path / "a16.png")
    out = read_image(tmp_path / "a16.png")
    assert out.dtype == np.float32 and out.shape == (40, 30)
    assert np.array_equal(out, a16.astype(np.float32))


def test_write_amplitude_png_stores_16_bit_of_unit_range(tmp_path):
    img = np.array([[0.0, 0.25], [0.5, 1.2]])  # 1.2 is clipped to 1
    write_amplitude_png(tmp_path / "x.png", img)
    assert read_image(tmp_path / "x.png").tolist() == [[0.0, 16384.0], [32768.0, 65535.0]]


def test_float32_tiff_exact_and_complex_gives_amplitude(tmp_path):
    a = np.random.default_rng(0).gamma(1.0, 0.3, size=(33, 47)).astype(np.float32)
    write_tiff(tmp_path / "a.tif", a)
    assert np.array_equal(read_image(tmp_path / "a.tif"), a)
    slc = (np.array([[3 + 4j, 1j]], np.complex64))
    tifffile.imwrite(tmp_path / "slc.tiff", slc)
    assert read_image(tmp_path / "slc.tiff").tolist() == [[5.0, 1.0]]


def test_jpeg_close_and_rgb_is_channel_mean(tmp_path):
    ramp = np.tile(np.linspace(20, 230, 64), (64, 1)).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "r.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "r.jpg") - ramp).max() <= 3

    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[...] = (30, 60, 120)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgb.png").tolist() == [[70.0, 70.0]] * 2
    assert read_image(tmp_path / "rgba.png").tolist() == [[70.0, 70.0]] * 2


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_file_names_path(tmp_path, suffix):
    src = tmp_path / f"full{suffix}"
    img = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    if suffix == ".tif":
        write_tiff(src, img)
    else:
        Image.fromarray(img).save(src)
    data = src.read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=str(bad)):
        read_image(bad)


def test_not_an_image_empty_and_missing(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes\.png: not an image"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match=r"nope\.png: cannot read file"):
        read_image(tmp_path / "nope.png")


def test_nan_and_inf_in_float_tiff_are_counted(tmp_path):
    a = np.ones((10, 10), np.float32)
    a[0, 0], a[1, 1], a[2, 2] = np.nan, np.inf, -np.inf
    write_tiff(tmp_path / "nan.tif", a)
    with pytest.raises(ImageReadError, match=r"nan\.tif: 3 non-finite pixels .* of 100"):
        read_image(tmp_path / "nan.tif")


def test_bytes_and_hf_struct(tmp_path):
    a16 = np.array([[0, 1000], [40000, 65535]], np.uint16)
    Image.fromarray(a16).save(tmp_path / "b.png")
    data = (tmp_path / "b.png").read_bytes()
    assert np.array_equal(read_image_bytes(data, "row 0"), a16)
    assert np.array_equal(read_image_bytes({"bytes": data, "path": "b.png"}, "row 0"), a16)
    with pytest.raises(ImageReadError, match=r"^row 3: "):
        read_image_bytes(data[:30], "row 3")


def test_16_bit_colour_png_is_refused_not_truncated(tmp_path):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rgb16 = np.full((2, 2, 3), [1000, 30000, 65535], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    with pytest.raises(ImageReadError, match=r"rgb16\.png: 16-bit colour PNG"):
        read_image(tmp_path / "rgb16.png")
    # Grey + alpha (colour type 4): PIL reads the high bytes only, so a dark image became zeros.
    la16 = np.full((2, 2, 2), [200, 65535], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in la16)
    (tmp_path / "la16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 4, 0, 0, 0))
                                        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match=r"la16\.png: 16-bit grey \+ alpha PNG"):
        read_image(tmp_path / "la16.png")


def test_a_multiband_float_tiff_is_refused_not_averaged(tmp_path):
    """A quad-pol float TIFF ((H, W, 4) or (4, H, W)) was read as the mean of its first three
    bands, silently; an 8-bit colour TIFF is still averaged to grey."""
    for shape in ((8, 8, 4), (4, 8, 8), (8, 8, 3)):
        tifffile.imwrite(tmp_path / "pol.tif", np.ones(shape, np.float32))
        with pytest.raises(ImageReadError, match=r"bands .*write one band per file"):
            read_image(tmp_path / "pol.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.full((8, 8, 3), [30, 60, 90], np.uint8))
    assert read_image(tmp_path / "rgb.tif").tolist() == np.full((8, 8), 60.0).tolist()


def test_read_pixels_gives_the_stored_depth_which_the_values_cannot(tmp_path):
    """A dark 16-bit image (every value <= 255) looks 8-bit by its values: the file says 16."""
    dark = np.array([[0, 100], [200, 255]], np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    Image.fromarray(dark.astype(np.uint8)).save(tmp_path / "a8.png")
    Image.fromarray(np.full((2, 2, 3), (30, 60, 120), np.uint8)).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "u16.tif", dark)
    tifffile.imwrite(tmp_path / "f32.tif", dark.astype(np.float32))
    np.save(tmp_path / "u16.npy", dark)
    np.save(tmp_path / "slc.npy", dark.astype(np.complex64))
    want = {"dark16.png": 16, "a8.png": 8, "rgb.png": 8, "u16.tif": 16, "f32.tif": None, "u16.npy": 16, "slc.npy": None}
    for name, bits in want.items():
        pixels, got = read_pixels(tmp_path / name)
        assert got == bits and pixels.dtype == np.float32, name
        assert np.array_equal(read_image(tmp_path / name), pixels), name
    assert read_pixels(tmp_path / "dark16.png")[0].tolist() == [[0.0, 100.0], [200.0, 255.0]]


def _packed_12_bit_tiff(a: np.ndarray) -> bytes:
    """An uncompressed TIFF of 12-bit samples packed MSB-first (a 12-bit sensor's export):
    tifffile writes the packed bytes as an 8-bit image, then its width and BitsPerSample tags
    are set to the 12-bit image's."""
    import io
    import struct

    h, w = a.shape
    x = a.reshape(h, w // 2, 2).astype(np.uint32)
    packed = np.stack([x[..., 0] >> 4, ((x[..., 0] & 15) << 4) | (x[..., 1] >> 8), x[..., 1] & 255], -1)
    buf = io.BytesIO()
    tifffile.imwrite(buf, packed.astype(np.uint8).reshape(h, w // 2 * 3), photometric="minisblack")
    out = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(out))) as tf:
        tags, order = {t.name: t for t in tf.pages[0].tags.values()}, tf.byteorder
    for name, value in (("ImageWidth", w), ("BitsPerSample", 12)):
        struct.pack_into(order + {3: "H", 4: "I"}[int(tags[name].dtype)], out, tags[name].valueoffset, value)
    return bytes(out)


def _unpack_12(data, dtype, bitspersample, runlen=0, *, out=None):
    """What imagecodecs.packints_decode gives for 12-bit MSB-first rows (for machines without it)."""
    b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.uint16)
    return np.stack([(b[:, 0] << 4) | (b[:, 1] >> 4), ((b[:, 1] & 15) << 8) | b[:, 2]], -1).ravel().astype(dtype)


def test_a_tiff_of_12_bit_samples_reports_12_bits_so_none_divides_by_4095(tmp_path, monkeypatch):
    from sar_ray.config import NormalizationConfig
    from sar_ray.data import normalize
    from sar_ray.data.io import read_pixels_bytes

    import importlib.util

    if importlib.util.find_spec("imagecodecs") is None:  # else it decodes packed integers itself
        monkeypatch.setattr(tifffile.tifffile.imagecodecs, "packints_decode", _unpack_12)
    a = (np.arange(16 * 8).reshape(16, 8) * 31 % 4096).astype(np.uint16)
    pixels, bits = read_pixels_bytes(_packed_12_bit_tiff(a), "scene.tif")
    assert np.array_equal(pixels, a.astype(np.float32)) and bits == 12
    out = normalize(pixels, NormalizationConfig(method="none"), bits)
    np.testing.assert_allclose(out, a / 4095.0, rtol=1e-6)  # not a / 65535: 16x too dark
