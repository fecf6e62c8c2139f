"""sar-ray data inspect: the counts, members, caption keys and amplitude statistics a user checks
before training, on shards whose content is known; one line and exit 2 on unusable input."""

import json
import tarfile

import numpy as np
import pytest

from sar_ray.cli import main
from sar_ray.data.inspect import inspect_data

from shards import slc, write_sarlo


def test_inspect_shards_reports_counts_members_captions_and_amplitude(tmp_path):
    write_sarlo(tmp_path, n_shards=3, per_shard=4, shape=(24, 32))
    info = inspect_data(str(tmp_path / "shard-{000000..000002}.tar"), sample=12)
    assert (info.kind, info.count, info.files, info.sampled) == ("webdataset", 12, 3, 12)
    assert info.members == {"sar.npy": 12, "sar.png": 12, "meta.json": 12}
    assert info.amplitude_member == "sar.npy" and info.shapes == {"sar.npy": {"24x32 complex64": 12}}
    assert {k: (v["n"], v["mean"]) for k, v in info.caption_keys.items()} == {
        "id": (12, 1.0), "caption.SHORT": (12, 2.0), "caption.MID": (12, 5.0), "caption.LONG": (12, 8.0)}
    amp = np.concatenate([np.abs(slc(f"{i:04d}")).ravel() for i in range(12)]).astype(np.float64)
    assert info.amplitude["mean"] == pytest.approx(amp.mean(), rel=1e-5)
    assert info.amplitude["std"] == pytest.approx(amp.std(), rel=1e-5)
    assert info.amplitude["p50"] == pytest.approx(np.percentile(amp, 50), rel=1e-5)
    # The amplitude PNG of the same scenes: its stored 16-bit values, 1000 x |s|.
    png = inspect_data(str(tmp_path), sample=3, image_column="sar.png", seed=1)
    assert png.shapes == {"sar.png": {"24x32 uint16": 3}} and png.sampled == 3
    assert 1000 <= png.amplitude["min"] and png.amplitude["max"] <= 7000


def test_inspect_cli_prints_and_exits_2_with_one_line_on_bad_input(capsys, tmp_path):
    write_sarlo(tmp_path / "d", n_shards=2, per_shard=2)
    assert main(["data", "inspect", str(tmp_path / "d"), "--sample", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["count"] == 4 and "caption.MID" in doc["caption_keys"]
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    for path, words in ((tmp_path / "nothing", "not found"), (tmp_path / "empty.tar", "empty dataset"),
                        (tmp_path / "d" / "shard-{000000..000004}.tar", "3 of 5 files it names do not exist")):
        assert main(["data", "inspect", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert main(["data", "inspect", str(tmp_path / "d"), "--image-column", "slc.npy"]) == 2
    assert "no sample has member 'slc.npy' (members: " in capsys.readouterr().err


def test_evaluate_reference_lists_shard_members_without_reading_them(tmp_path):
    from sar_ray.data.io import read_image
    from sar_ray.evaluate import list_images

    write_sarlo(tmp_path, n_shards=2, per_shard=3)
    items, _ = list_images(str(tmp_path), "reference", max_images=4, columns=("sar.npy", "caption.MID"))
    assert [it.name for it in items] == [f"{tmp_path}/shard-00000{i // 3}.tar:{i:04d}" for i in range(4)]
    assert [it.text for it in items] == [f"a SAR scene number {i:04d}" for i in range(4)]
    assert all(it.image_bytes is None for it in items)  # a path per member: nothing held on the driver
    np.testing.assert_array_equal(read_image(items[3].path), np.abs(slc("0003")))


def test_inspect_notes_16_bit_samples_that_use_only_12_bits(tmp_path):
    """12-bit sensor counts in 16-bit PNGs: the one setting that would read them 16x too dark
    (`method: none` divides by 65535) is named, with the fix; 8-bit files get no note."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 4096, (16, 16)).astype(np.uint16)).save(tmp_path / f"{i}.png")
    info = inspect_data(str(tmp_path), sample=3)
    assert len(info.notes) == 1 and "data.normalization.bits=12" in info.notes[0]
    eight = tmp_path / "eight"
    eight.mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(eight / "0.png")
    assert inspect_data(str(eight), sample=1).notes == []
    # One bright target in a large scene: the note reads every pixel, not the statistics' subsample.
    big = tmp_path / "big"
    big.mkdir()
    scene = rng.integers(0, 3000, (512, 512)).astype(np.uint16)
    scene[100, 200] = 8000
    Image.fromarray(scene).save(big / "0.png")
    (note,) = inspect_data(str(big), sample=1).notes
    assert "largest sampled value is 8000 (13 bits)" in note and "bits=13" in note
