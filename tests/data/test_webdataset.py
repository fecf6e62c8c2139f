"""WebDataset input (SARLO-80 layout): the rows training sees equal a caption table's, the split
follows the sample key, and every kind of bad input is one line naming the shard and key."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sar_ray.cli import main
from sar_ray.config import DataConfig
from sar_ray.data import DataError, ImageReadError, Record, build_datasets, split_records, stable_hash
from sar_ray.data.webdataset import pick_text

from shards import sample, slc, write_sarlo, write_shard

ROOT = Path(__file__).resolve().parents[2]


def _by_key(ds) -> dict[str, dict]:
    return {r["path"].rsplit(":", 1)[-1].rsplit("/", 1)[-1].split(".")[0]: r for r in ds.take_all()} if ds else {}


def _cfg(path, **kw) -> DataConfig:
    base = {"image_column": "sar.npy", "text_column": "caption.MID", "resolution": 16, "val_fraction": 0.0}
    return DataConfig(path=str(path), **{**base, **kw})


def test_shards_give_the_rows_a_caption_table_of_the_same_images_gives(ray_local, tmp_path):
    write_sarlo(tmp_path / "wds", n_shards=2, per_shard=3, shape=(24, 40))
    # The same scenes as an imagefolder of .npy files: training must not see a difference.
    (tmp_path / "folder").mkdir()
    rows = []
    for k in [f"{i:04d}" for i in range(6)]:
        np.save(tmp_path / "folder" / f"{k}.npy", slc(k, (24, 40)))
        rows.append({"file_name": f"{k}.npy", "text": f"a SAR scene number {k}"})
    (tmp_path / "folder" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    shards = build_datasets(_cfg(tmp_path / "wds"), seed=0)
    # holdout_fraction=0: shards keep every non-validation sample for training (no held-out slice)
    table = build_datasets(_cfg(tmp_path / "folder", image_column="file_name", text_column="text",
                                holdout_fraction=0.0), seed=0)
    assert (shards.n_train, shards.n_val, shards.n_skipped) == (6, 0, 0)
    a, b = _by_key(shards.train), _by_key(table.train)
    assert sorted(a) == sorted(b) == [f"{i:04d}" for i in range(6)]
    assert sorted(next(iter(a.values()))) == ["crop_top_left", "original_size", "path", "pixel_values", "text"]
    for k in a:
        np.testing.assert_array_equal(a[k]["pixel_values"], b[k]["pixel_values"])  # |s| of the SLC, normalised
        assert a[k]["text"] == b[k]["text"] == f"<SAR> a SAR scene number {k}"
        assert a[k]["original_size"].tolist() == [24, 40] and a[k]["crop_top_left"].tolist() == [0, 5]
    assert a["0004"]["path"] == f"{tmp_path}/wds/shard-000001.tar:0004"  # what messages and logs name


def test_split_by_sample_key_like_caption_tables_and_brace_patterns(ray_local, tmp_path):
    write_sarlo(tmp_path, n_shards=3, per_shard=4)
    cfg = _cfg(tmp_path / "shard-{000000..000001}.tar", val_fraction=0.3, text_column=["caption.SHORT", "caption.LONG"])
    data = build_datasets(cfg, seed=0)
    keys = [f"{i:04d}" for i in range(8)]  # the two shards the pattern names
    _, want_val = split_records([Record(None, None, "", None, k) for k in keys], 0.3)
    val, train = _by_key(data.val), _by_key(data.train)
    assert sorted(val) == sorted(r.name for r in want_val) and (data.n_train, data.n_val) == (8 - len(val), len(val))
    assert sorted([*train, *val]) == keys
    # One caption per image from the list, chosen by the key's hash: the same every build.
    for k, row in {**train, **val}.items():
        texts = [f"scene {k}", f"a long description of SAR scene number {k}"]
        assert row["text"] == "<SAR> " + pick_text(texts, stable_hash(k) >> 1)


def _trial(capsys, tmp_path, path, *sets):
    args = ["trial", str(ROOT / "sweeps/quickstart.yaml"), "-q", "--out", str(tmp_path / "out"),
            "--set", "tracking.enabled=false", "--set", f"data.path={path}", "--set", "model.pretrained=tiny-sd",
            "--set", "data.image_column=sar.npy", "--set", "data.text_column=caption.MID"]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    out, err = capsys.readouterr()
    assert not (tmp_path / "out" / "weights").exists()  # refused before training
    return code, err.strip()


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


BAD = {
    "missing member": ({"sar.png": sample("0001")["sar.png"], "meta.json": sample("0001")["meta.json"]},
                       r"shard-000000.tar: sample 0001: no member 'sar.npy' \(members: meta.json, sar.png\)"),
    "json path": (sample("0001"), r"shard-000000.tar: sample 0001: meta.json has no 'caption.XL' \(paths found: id, caption.SHORT"),
    "complex dtype": ({**sample("0001"), "sar.npy": _npy(np.zeros((8, 8), dtype=[("re", "<i2"), ("im", "<i2")]))},
                      r"shard-000000.tar: sample 0001: sar.npy: complex samples stored as a record dtype"),
    "complex shape": ({**sample("0001"), "sar.npy": _npy(np.zeros((8, 8, 2), np.float32))},
                      r"shard-000000.tar: sample 0001: sar.npy: array of shape \(8, 8, 2\); expected one 2-D band"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_shards_exit_2_with_one_line_naming_shard_and_key(capsys, tmp_path, monkeypatch, ray_local, case):
    monkeypatch.chdir(tmp_path)
    members, message = BAD[case]
    write_shard(tmp_path / "d" / "shard-000000.tar", {"0001": members})
    code, err = _trial(capsys, tmp_path, tmp_path / "d", *(["data.text_column=caption.XL"] if case == "json path" else []))
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    import re

    assert re.search(message, err), err


def test_empty_dataset_and_unreachable_s3_exit_2(capsys, tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e").mkdir()
    with tarfile.open(tmp_path / "e" / "shard-000000.tar", "w"):
        pass
    code, err = _trial(capsys, tmp_path, tmp_path / "e" / "shard-000000.tar")
    assert code == 2 and "shard-000000.tar: shard holds no samples" in err and len(err.splitlines()) == 1
    code, err = _trial(capsys, tmp_path, tmp_path / "e" / "shard-{000000..000003}.tar")
    assert code == 2 and "3 of 4 files it names do not exist (first: " in err and "shard-000001.tar" in err
    # A closed port: pyarrow's S3 client fails at once (after its retries), no network needed.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    code, err = _trial(capsys, tmp_path, "s3://bucket/sarlo80?endpoint_override=127.0.0.1:9&scheme=http")
    assert code == 2 and "s3://bucket/sarlo80" in err and "cannot reach" in err and len(err.splitlines()) == 1


def test_one_bad_shard_follows_on_corrupt(ray_local, tmp_path):
    write_sarlo(tmp_path, n_shards=2, per_shard=3)
    # A third shard whose samples lack the SLC member (the config fits the first shard).
    write_shard(tmp_path / "shard-000002.tar", {k: {"meta.json": sample(k)["meta.json"]} for k in ("0006", "0007")})
    with pytest.raises(ImageReadError, match=r"shard-000002.tar: sample 0006: no member 'sar.npy'.*\(2 of 8 images"):
        build_datasets(_cfg(tmp_path, on_corrupt="error"), seed=0)
    data = build_datasets(_cfg(tmp_path), seed=0)
    assert (data.n_train, data.n_skipped) == (6, 2)
    assert data.skipped == [f"{tmp_path}/shard-000002.tar:0006", f"{tmp_path}/shard-000002.tar:0007"]
    assert sorted(_by_key(data.train)) == [f"{i:04d}" for i in range(6)]


def test_config_that_fits_no_sample_fails_on_the_driver_before_any_scan(tmp_path):
    # No Ray here: the first samples are checked on the driver.
    write_sarlo(tmp_path, n_shards=1, per_shard=2)
    with pytest.raises(DataError, match=r"shard-000000.tar: sample 0000: no member 'slc.npy'"):
        build_datasets(_cfg(tmp_path, image_column="slc.npy"), seed=0)


def test_parquet_with_image_bytes_streams_with_the_caption_tables_names_split_and_skips(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sar_ray.data import read_table

    rows = [{"image": sample(f"{i:04d}")["sar.png"], "text": f"scene {i}"} for i in range(12)]
    rows[3]["image"] = b"\x89PNG\r\n\x1a\n truncated"
    # Two row groups: names come from each row's index in the file, not in its batch.
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=5)
    cfg = _cfg(tmp_path / "t.parquet", image_column="image", text_column="text", val_fraction=0.3)
    data = build_datasets(cfg, seed=0)
    records = [r for r in read_table(tmp_path / "t.parquet", image_column="image") if r.name != "t.parquet[row 3]"]
    want_train, want_val = split_records(records, 0.3)
    assert (data.n_train, data.n_val, data.n_skipped, data.skipped) == (len(want_train), len(want_val), 1, ["t.parquet[row 3]"])
    assert sorted(r["path"] for r in data.val.take_all()) == sorted(r.name for r in want_val)
    got = {r["path"]: r["text"] for r in data.train.take_all()}
    assert got == {r.name: f"<SAR> {r.text}" for r in want_train}
    with pytest.raises(ImageReadError, match=r"t.parquet\[row 3\]: .*\(1 of 12 images"):
        build_datasets(cfg.model_copy(update={"on_corrupt": "error"}), seed=0)
    with pytest.raises(DataError, match=r"t.parquet: no column 'caption' \(columns: image, text\)"):
        build_datasets(cfg.model_copy(update={"text_column": "caption"}), seed=0)


def test_the_driver_receives_one_summary_per_read_task_not_per_batch_of_rows(ray_local, monkeypatch):
    # 3,000 scan rows in 3 blocks (3 read tasks), 2 unusable: before, the driver folded one summary
    # per 256 rows (12 rows, an Arrow chunk per row and column: driver memory grew with the rows).
    import ray.data

    from sar_ray.data import streamed

    names = [f"s{i:05d}" for i in range(3000)]
    bad = {"s00007": "shard-0.tar:s00007", "s02999": "shard-2.tar:s02999"}
    rows = [{"name": n, "where": bad.get(n, n), "error": "broken" if n in bad else ""} for n in names]
    folded = []
    fold = streamed._fold
    monkeypatch.setattr(streamed, "_fold", lambda out, batch: folded.append(len(batch["n"])) or fold(out, batch))
    scan = streamed._collect(ray.data.from_items(rows, override_num_blocks=3), val_fraction=0.1)
    assert sum(folded) == 3  # rows the driver received
    good = [n for n in names if n not in bad]
    units = sorted((streamed.stable_unit(n), n) for n in good)
    assert (scan.n, scan.n_good, scan.n_val) == (3000, 2998, sum(u < 0.1 for u, _ in units))
    assert scan.bad == bad and scan.first_error == "broken"
    assert (scan.lowest, scan.highest) == (units[0], units[-1])
