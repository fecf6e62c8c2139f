"""build_datasets: the rows training sees, the split, corrupt images, and real MSTAR chips."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sar_ray.config import DataConfig, NormalizationConfig, SynthConfig
from sar_ray.data import (
    DataError,
    ImageReadError,
    build_datasets,
    load_folder_arrays,
    prepare_image,
    read_image,
    to_model_range,
    to_three_channels,
)
from sar_ray.data import dataset
from sar_ray.data.dataset import to_pixel_values

MSTAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mstar-train"
N = 12


@pytest.fixture
def folder(tmp_path):
    """N 16-bit PNGs of different shapes; captions alternate with/without the <SAR> prefix."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        h, w = (40, 60) if i % 2 else (50, 50)
        a = rng.integers(100, 60000, (h, w)).astype(np.uint16)
        name = f"img/{i:02d}.png"
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(a).save(tmp_path / name)
        text = f"<SAR> image {i}" if i % 2 else f"image {i}"
        rows.append({"file_name": name, "text": text})
    # One constant image: reference normalisation maps it to exactly 1 (-> 65535, +1 model range).
    Image.fromarray(np.full((50, 50), 500, np.uint16)).save(tmp_path / "flat.png")
    rows.append({"file_name": "flat.png", "text": "flat"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _rows(ds):
    return ds.take_all() if ds is not None else []


# These tests count train/val images: holdout_fraction=0 keeps every other image in training
# (the held-out split has its own tests, tests/data/test_splits.py).
def test_rows_shape_range_and_prefix(ray_local, folder):
    cfg = DataConfig(path=str(folder), resolution=32, val_fraction=0.0, holdout_fraction=0.0)
    data = build_datasets(cfg, seed=0)
    assert (data.n_train, data.n_val, data.val, data.n_skipped) == (N + 1, 0, None, 0)
    assert data.source == str(folder)
    rows = sorted(_rows(data.train), key=lambda r: (r["path"].endswith("flat.png"), r["path"]))  # train order is shuffled
    assert sorted(rows[0]) == ["crop_top_left", "original_size", "path", "pixel_values", "text"]
    for row in rows:
        x = row["pixel_values"]
        assert x.shape == (1, 32, 32) and x.dtype == np.uint16  # one channel, 2 bytes a pixel
        assert row["text"].startswith("<SAR> ") and "<SAR> <SAR>" not in row["text"]
    assert [r["text"] for r in rows[:2]] == ["<SAR> image 0", "<SAR> image 1"]
    # SDXL micro-conditioning: the size before resizing and the crop corner in the resized image
    # (a 40 x 60 image -> 32 x 48, centre crop 8 px from the left).
    assert rows[0]["original_size"].tolist() == [50, 50] and rows[0]["crop_top_left"].tolist() == [0, 0]
    assert rows[1]["original_size"].tolist() == [40, 60] and rows[1]["crop_top_left"].tolist() == [0, 8]
    flat = next(r for r in rows if r["path"].endswith("flat.png"))
    assert (flat["pixel_values"] == 65535).all()
    # The workers compute exactly what the plain helpers compute: round(img01 * 65535).
    p = rows[1]["path"]
    img01 = prepare_image(read_image(p), NormalizationConfig(), 32)
    np.testing.assert_array_equal(rows[1]["pixel_values"], np.round(img01[None] * 65535).astype(np.uint16))

    no_prefix = build_datasets(cfg.model_copy(update={"caption_prefix": None}), seed=0)
    texts = [r["text"] for r in sorted(_rows(no_prefix.train), key=lambda r: (r["path"].endswith("flat.png"), r["path"]))]
    assert texts[:2] == ["image 0", "<SAR> image 1"]


def test_uint16_rows_give_the_model_the_float_pixels_of_the_old_path_to_a_rounding_step(folder):
    """The lean rows, widened by `train.model_pixels` as a worker does, equal the float32
    (3, R, R) [-1, 1] pixels built directly from the prepared image to within half a uint16
    step (1/65535 in [-1, 1]): a wrong scale, offset or truncation instead of rounding fails."""
    import torch

    from sar_ray.train import model_pixels

    paths = [folder / f"img/{i:02d}.png" for i in range(4)] + [folder / "flat.png"]
    batch = {"key": np.arange(len(paths)), "path": np.array([str(p) for p in paths], object),
             "image_bytes": np.array([None] * len(paths), object), "name": np.array([p.name for p in paths], object),
             "text": np.array(["x"] * len(paths), object)}
    out = dataset._prepare_batch(batch, NormalizationConfig(), resolution=32, seed=0, crop="center")
    assert out["pixel_values"].shape == (len(paths), 1, 32, 32) and out["pixel_values"].dtype == np.uint16
    old = np.stack([to_three_channels(to_model_range(prepare_image(read_image(p), NormalizationConfig(), 32)))
                    for p in paths])  # (B, 3, R, R) float32 in [-1, 1], what rows held before
    new = model_pixels(torch.from_numpy(out["pixel_values"]))
    assert new.dtype == torch.float32 and tuple(new.shape) == old.shape
    np.testing.assert_allclose(new.numpy(), old, rtol=0, atol=1.01 / 65535)  # float32 arithmetic: the 1%
    assert new.numpy()[-1].min() == 1.0 and new.numpy().min() >= -1.0  # the flat image: exactly +1

    # A batch with nothing left (every image unreadable, skipped): the same dtype and shape.
    bad = {**batch, "path": np.array([str(folder / "missing.png")], object), "key": np.arange(1),
           "image_bytes": np.array([b"junk"], object), "name": np.array(["missing.png"], object),
           "text": np.array(["x"], object)}
    empty = dataset._prepare_batch(bad, NormalizationConfig(), resolution=32, seed=0, crop="center",
                                   skip_unreadable=True)
    assert empty["pixel_values"].shape == (0, 1, 32, 32) and empty["pixel_values"].dtype == np.uint16
    assert tuple(model_pixels(torch.from_numpy(empty["pixel_values"])).shape) == (0, 3, 32, 32)


def test_to_pixel_values_rounds_to_the_nearest_step():
    img01 = np.array([[0.0, 1.0], [0.4999 / 65535, 0.5001 / 65535]], np.float32)
    assert to_pixel_values(img01).tolist() == [[[0, 65535], [0, 1]]]


def test_materialized_rows_hold_two_bytes_a_pixel(ray_local, folder, monkeypatch):
    """Prepared rows in the object store are R * R * 2 bytes of pixels (Arrow adds an 8-byte
    offset a row), and `data.materialize=auto` estimates exactly those bytes."""
    r = 32
    cfg = DataConfig(path=str(folder), resolution=r, val_fraction=0.0, holdout_fraction=0.0, materialize="always")
    data = build_datasets(cfg, seed=0)
    assert data.materialized
    pixels = data.train.select_columns(["pixel_values"]).materialize()
    per_row = pixels.size_bytes() / data.n_train
    assert r * r * 2 <= per_row <= r * r * 2 + 8
    auto = cfg.model_copy(update={"materialize": "auto"})
    monkeypatch.setattr(dataset, "MATERIALIZE_BUDGET", data.n_train * r * r * 2)
    assert dataset._materialize(auto, data.n_train)
    monkeypatch.setattr(dataset, "MATERIALIZE_BUDGET", data.n_train * r * r * 2 - 1)
    assert not dataset._materialize(auto, data.n_train)


def test_split_deterministic_disjoint_and_order_stable(ray_local, folder, monkeypatch):
    import ray.data

    # Many small blocks, so parallel tasks could finish out of order.
    monkeypatch.setattr(dataset, "ROWS_PER_BLOCK", 1)
    cfg = DataConfig(path=str(folder), resolution=16, val_fraction=0.3, holdout_fraction=0.0)
    a, b = build_datasets(cfg, seed=0), build_datasets(cfg, seed=1)
    assert ray.data.DataContext.get_current().execution_options.preserve_order
    train_a, val_a = [r["path"] for r in _rows(a.train)], [r["path"] for r in _rows(a.val)]
    train_b, val_b = [r["path"] for r in _rows(b.train)], [r["path"] for r in _rows(b.val)]
    a_again = build_datasets(cfg, seed=0)
    assert [r["path"] for r in _rows(a_again.train)] == train_a  # the same seed, the same order
    assert val_a == val_b and sorted(train_a) == sorted(train_b)  # the split ignores the seed
    assert train_a != train_b  # the train order is a seeded global permutation
    assert a.n_val == len(val_a) >= 1 and a.n_train == len(train_a)
    assert not set(train_a) & set(val_a) and len(set(train_a) | set(val_a)) == N + 1
    table = [str(folder / f"img/{i:02d}.png") for i in range(N)] + [str(folder / "flat.png")]
    assert train_a != [p for p in table if p in train_a]  # not the table's order
    assert val_a == [p for p in table if p in val_a]  # validation keeps table order
    # At least one validation image even when the fraction rounds to none.
    tiny = build_datasets(cfg.model_copy(update={"val_fraction": 0.01, "max_images": 3}), seed=0)
    assert (tiny.n_train, tiny.n_val) == (2, 1)


def test_random_crop_depends_on_seed_and_file_only(ray_local, folder):
    cfg = DataConfig(path=str(folder), resolution=16, crop="random", val_fraction=0.0, holdout_fraction=0.0,
                     max_images=4)
    wide = lambda d: next(r["pixel_values"] for r in _rows(d.train) if r["path"].endswith("01.png"))  # noqa: E731 - 40x60
    a0, a0_again, a1 = (wide(build_datasets(cfg, seed=s)) for s in (0, 0, 1))
    assert np.array_equal(a0, a0_again)
    assert not np.array_equal(a0, a1)


def test_corrupt_images_skip_or_error(ray_local, folder):
    data = (folder / "img" / "00.png").read_bytes()
    (folder / "img" / "03.png").write_bytes(data[: len(data) // 3])  # truncated
    (folder / "img" / "05.png").write_text("not an image")
    cfg = DataConfig(path=str(folder), resolution=16, val_fraction=0.2, holdout_fraction=0.0)
    out = build_datasets(cfg, seed=0)
    bad = [str(folder / "img" / "03.png"), str(folder / "img" / "05.png")]
    assert (out.n_skipped, out.skipped) == (2, bad)
    assert out.n_train + out.n_val == N + 1 - 2
    assert not {r["path"] for r in _rows(out.train) + _rows(out.val)} & set(bad)

    with pytest.raises(ImageReadError, match=re.escape(bad[0]) + r".*2 of 13 images .*on_corrupt=skip"):
        build_datasets(cfg.model_copy(update={"on_corrupt": "error"}), seed=0)


def test_nothing_usable_and_bad_tables(ray_local, tmp_path):
    (tmp_path / "a.png").write_text("junk")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no usable images (all 1 unreadable")):
        build_datasets(DataConfig(path=str(tmp_path)), seed=0)

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"1 of 1 rows name images that do not exist .*b\.png"):
        build_datasets(DataConfig(path=str(tmp_path)), seed=0)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(f"{empty}: folder is empty")):
        build_datasets(DataConfig(path=str(empty)), seed=0)


def test_synthetic_default(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cache folder is relative to the working directory
    cfg = DataConfig(synthetic=SynthConfig(n=20, size=32), resolution=32, val_fraction=0.2, holdout_fraction=0.0)
    data = build_datasets(cfg, seed=0)
    assert data.source.startswith(str(tmp_path / ".sar-ray-cache"))
    assert data.n_train + data.n_val == 20 and data.n_val >= 1
    rows = _rows(data.train)
    assert len(rows) == data.n_train and rows[0]["text"].startswith("<SAR> image of ")
    assert all(r["path"].startswith(data.source) for r in rows)


def test_load_folder_arrays_without_ray(folder, tmp_path):
    arrays, records = load_folder_arrays(folder, NormalizationConfig(), resolution=20)
    assert len(arrays) == N + 1 and all(a.shape == (20, 20) and a.dtype == np.float32 for a in arrays)
    assert records[0].text == "image 0" and arrays[-1].min() == 1.0  # the flat image
    # A folder with no captions (generated samples): sorted images, scaled only to [0, 1].
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.fromarray(np.full((4, 6), 65535 // 5, np.uint16)).save(gen / "b.png")
    Image.fromarray(np.full((4, 6), 65535, np.uint16)).save(gen / "a.png")
    arrays, records = load_folder_arrays(gen)
    assert [r.name for r in records] == ["a.png", "b.png"] and records[0].text == ""
    assert arrays[0].shape == (4, 6) and arrays[0].max() == 1.0
    assert arrays[1].max() == pytest.approx(0.2, abs=1e-6)


@pytest.mark.skipif(not MSTAR.is_dir(), reason=f"{MSTAR} not present")
def test_mstar_loads_as_is(ray_local):
    cfg = DataConfig(path=str(MSTAR), resolution=64, val_fraction=0.1, holdout_fraction=0.0)
    data = build_datasets(cfg, seed=0)
    assert (data.n_train + data.n_val, data.n_skipped) == (1000, 0)
    assert 60 <= data.n_val <= 140
    rows = data.train.take(8)
    assert all(r["pixel_values"].shape == (1, 64, 64) and r["pixel_values"].dtype == np.uint16 for r in rows)
    assert all(r["text"].startswith("<SAR> image of ") and r["text"].count("<SAR>") == 1 for r in rows)
    assert rows[0]["path"].startswith(str(MSTAR))


def test_resize_is_antialiased_and_keeps_float_precision():
    # A one-pixel checkerboard shrunk 4x must average to grey, not alias to black or white.
    board = (np.indices((64, 96)).sum(axis=0) % 2).astype(np.float32)
    small = prepare_image(board, NormalizationConfig(method="none"), 16)
    assert small.shape == (16, 16)
    assert np.abs(small - 0.5).max() < 0.05
    # Values between 8-bit steps survive (float resize, no uint8 round trip).
    ramp = np.tile(np.linspace(0.1, 0.1 + 1e-4, 32, dtype=np.float32), (32, 1))
    out = prepare_image(ramp, NormalizationConfig(method="none"), 16)
    assert 0 < np.ptp(out) < 2e-4


def test_method_none_divides_by_the_files_depth_not_a_guess_from_its_values(tmp_path):
    """Training, `load_folder_arrays` and evaluation read a dark 16-bit scene (max 200 of
    65535) as dark and an 8-bit colour picture as / 255. Before, the values decided: 200 looked
    8-bit (/ 255, 257x too bright) and a colour mean of max 70.33 was divided by 70.33."""
    from PIL import Image

    from sar_ray.evaluate import load_image

    rng = np.random.default_rng(0)
    dark = rng.integers(0, 201, (8, 8)).astype(np.uint16)
    dark[0, 0] = 200
    Image.fromarray(dark).save(tmp_path / "a_dark16.png")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[...] = (30, 60, 121)  # mean 70.33: not a whole number, so the old guess divided by the max
    colour[0, 0] = 0
    Image.fromarray(colour).save(tmp_path / "b_colour8.png")
    none = NormalizationConfig(method="none")
    want = {"a_dark16.png": dark / 65535, "b_colour8.png": colour.mean(axis=-1) / 255}

    arrays, records = load_folder_arrays(tmp_path, none)
    for img, r in zip(arrays, records):
        np.testing.assert_allclose(img, want[Path(r.path).name], atol=1e-6)
    paths = sorted(tmp_path.glob("*.png"))
    batch = {"key": np.arange(2), "path": np.array([str(p) for p in paths], object),
             "image_bytes": np.array([None, None], object), "name": np.array([p.name for p in paths], object),
             "text": np.array(["x", "x"], object)}
    out = dataset._prepare_batch(batch, none, resolution=8, seed=0, crop="center")
    for row, p in zip(out["pixel_values"], paths):
        np.testing.assert_allclose(row[0] / 65535, want[p.name], atol=1e-4)
    for p, depth in zip(paths, (16, 8)):
        img, _, got = load_image(str(p), None, p.name, none, (8, 8))
        assert got == depth, p.name
        np.testing.assert_allclose(img, want[p.name], atol=1e-6)


def test_declared_12_bit_samples_in_16_bit_pngs_are_read_as_12_bit_by_training_and_evaluation(tmp_path):
    """`data.normalization.bits: 12` is honoured by every reader (training batches,
    `load_folder_arrays`, evaluation), and a pixel above 4095 stops them naming its file, even
    where unreadable images are skipped (streamed data)."""
    from sar_ray.data.normalize import DepthError
    from sar_ray.evaluate import load_image

    a = (np.arange(64).reshape(8, 8) * 64).astype(np.uint16)  # 0 .. 4032: 12-bit counts
    Image.fromarray(a).save(tmp_path / "a.png")
    twelve = NormalizationConfig(method="none", bits=12)
    arrays, _ = load_folder_arrays(tmp_path, twelve)
    np.testing.assert_allclose(arrays[0], a / 4095, atol=1e-6)
    batch = {"key": np.arange(1), "path": np.array([str(tmp_path / "a.png")], object),
             "image_bytes": np.array([None], object), "name": np.array(["a.png"], object),
             "text": np.array(["x"], object)}
    out = dataset._prepare_batch(batch, twelve, resolution=8, seed=0, crop="center")
    np.testing.assert_allclose(out["pixel_values"][0, 0] / 65535, a / 4095, atol=1e-4)
    np.testing.assert_allclose(load_image(str(tmp_path / "a.png"), None, "a.png", twelve, (8, 8))[0], a / 4095, atol=1e-6)

    a[0, 0] = 5000
    Image.fromarray(a).save(tmp_path / "a.png")
    with pytest.raises(DepthError, match=r"a\.png: a pixel of 5000 is above the full scale 4095"):
        dataset._prepare_batch(batch, twelve, resolution=8, seed=0, crop="center", skip_unreadable=True)
    with pytest.raises(DepthError, match=r"a\.png: a pixel of 5000"):
        load_folder_arrays(tmp_path, twelve)


def test_a_folder_contradicting_the_declared_depth_stops_before_training_even_when_skipping(tmp_path, ray_local):
    """The check pass that finds unreadable images also finds images that contradict
    `data.normalization.bits`; with `data.on_corrupt=skip` too they stop the trial (one line,
    with the count), rather than leave out the set's brightest scenes."""
    from sar_ray.data.normalize import DepthError

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 4096, (16, 16)).astype(np.uint16)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n"
                                                     for i in range(6)))
    cfg = DataConfig(path=str(tmp_path), resolution=16, normalization={"method": "none", "bits": 12},
                     on_corrupt="skip", val_fraction=0.0, holdout_fraction=0.0)
    assert build_datasets(cfg, 0).n_train == 6
    bright = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
    bright[3, 3] = 9000
    Image.fromarray(bright).save(tmp_path / "4.png")
    with pytest.raises(DepthError, match=r"4\.png: a pixel of 9000 is above the full scale 4095 .* \(1 of 6 images\)$"):
        build_datasets(cfg, 0)
