"""Caption tables: every accepted layout gives the same records; every mistake one clear line."""

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sar_ray.data import DataError, read_image, read_image_bytes, read_table

ROWS = [
    {"file_name": "water/0.png", "text": "<SAR> image of open water", "label": "water"},
    {"file_name": "urban/1.png", "text": "image of an urban area", "label": "urban"},
    {"file_name": "2.png", "text": "NA", "label": "fields"},  # "NA" must stay text in CSV
]


@pytest.fixture
def images(tmp_path):
    """A folder with three 16-bit PNGs and no caption file; returns (folder, arrays)."""
    arrays = {}
    for i, row in enumerate(ROWS):
        p = tmp_path / row["file_name"]
        p.parent.mkdir(exist_ok=True)
        a = np.full((8, 12), 1000 * (i + 1), np.uint16)
        Image.fromarray(a).save(p)
        arrays[row["file_name"]] = a.astype(np.float32)
    return tmp_path, arrays


def _summary(records):
    out = []
    for r in records:
        pixels = read_image(r.path) if r.image_bytes is None else read_image_bytes(r.image_bytes, r.name)
        out.append((r.name, r.text, r.label, pixels.tolist()))
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_csv_parquet_paths_and_bytes_agree(images):
    root, arrays = images
    _write_jsonl(root / "metadata.jsonl", ROWS)
    from_jsonl = read_table(root)
    assert [r.path for r in from_jsonl] == [str(root / row["file_name"]) for row in ROWS]
    assert from_jsonl[2].text == "NA" and from_jsonl[0].label == "water"
    expected = _summary(from_jsonl)
    assert expected[1][3] == arrays["urban/1.png"].tolist()

    pd.DataFrame(ROWS).to_csv(root / "captions.csv", index=False)
    assert _summary(read_table(root / "captions.csv")) == expected
    pq.write_table(pa.Table.from_pylist(ROWS), root / "captions.parquet")
    assert _summary(read_table(root / "captions.parquet")) == expected

    # Bytes in the image column, plain and as a Hugging Face struct (whose path names it).
    plain = [{**r, "file_name": (root / r["file_name"]).read_bytes()} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(plain), root / "bytes.parquet")
    recs = read_table(root / "bytes.parquet")
    assert all(r.path is None and r.image_bytes for r in recs)
    assert recs[0].name == "bytes.parquet[row 0]"
    assert [s[1:] for s in _summary(recs)] == [s[1:] for s in expected]
    hf = [{**r, "image": {"bytes": (root / r["file_name"]).read_bytes(), "path": r["file_name"]}}
          for r in ROWS]
    pq.write_table(pa.Table.from_pylist(hf), root / "hf.parquet")
    assert _summary(read_table(root / "hf.parquet", image_column="image")) == expected


def test_single_caption_file_in_folder_and_override(images):
    root, _ = images
    pd.DataFrame(ROWS).to_csv(root / "a.csv", index=False)
    assert len(read_table(root)) == 3  # the only caption file is found
    pd.DataFrame(ROWS[:1]).to_csv(root / "b.csv", index=False)
    with pytest.raises(DataError, match=r"several caption files \(a\.csv, b\.csv\).*data\.captions"):
        read_table(root)
    assert len(read_table(root, captions="b.csv")) == 1  # relative to data.path
    with pytest.raises(DataError, match=r"c\.csv: caption file not found"):
        read_table(root, captions="c.csv")


def test_custom_columns(images):
    root, _ = images
    rows = [{"img": r["file_name"], "caption": r["text"]} for r in ROWS]
    pd.DataFrame(rows).to_csv(root / "caps.csv", index=False)
    recs = read_table(root / "caps.csv", image_column="img", text_column="caption")
    assert [r.text for r in recs] == [r["text"] for r in ROWS] and recs[0].label is None


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: data path not found")):
        read_table(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: folder is empty or has no images")):
        read_table(tmp_path)


def test_images_without_captions_tell_how_to_add_them(images):
    root, _ = images
    with pytest.raises(DataError) as e:
        read_table(root)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"add {root / 'metadata.jsonl'}" in msg and '"file_name": ' in msg and '"text": ' in msg


def test_rows_naming_missing_images(images):
    root, _ = images
    rows = ROWS + [{"file_name": f"gone/{i}.png", "text": "x"} for i in range(7)]
    _write_jsonl(root / "metadata.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_table(root)
    msg = str(e.value)
    assert msg.startswith(f"{root / 'metadata.jsonl'}: 7 of 10 rows name images that do not exist")
    assert "gone/0.png, gone/1.png" in msg and "gone/5.png" not in msg  # the first five only


def test_missing_column_lists_present_ones(images):
    root, _ = images
    _write_jsonl(root / "metadata.jsonl", [{"file_name": r["file_name"], "caption": r["text"]} for r in ROWS])
    with pytest.raises(DataError, match=r"no column 'text' \(columns: file_name, caption\).*data\.text_column"):
        read_table(root)


@pytest.mark.parametrize("name,content", [("metadata.jsonl", "\n"), ("caps.csv", "file_name,text\n")])
def test_empty_table(images, name, content):
    root, _ = images
    (root / name).write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{root / name}: caption table has no rows")):
        read_table(root)


def test_bad_json_line_number(images):
    root, _ = images
    (root / "metadata.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: not valid JSON"):
        read_table(root)
