"""Caption tables: which image goes with which text.

Accepted layouts (`path` is ``data.path``, `captions` is ``data.captions``):

- a folder with ``metadata.jsonl`` (Hugging Face imagefolder: ``file_name``, ``text``,
  optional ``label``), or with exactly one ``.csv`` / ``.parquet`` / ``.jsonl`` file inside;
- a ``.csv``, ``.parquet`` or ``.jsonl`` file; image paths are relative to its folder;
- in Parquet, the image column may hold the encoded bytes (or an HF struct ``{bytes, path}``).

Relative image paths resolve against the data folder (``data.path``, or the caption file's
folder when ``data.path`` is a file). Errors are :class:`DataError`, one line naming the file
and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sar_ray.data.io import IMAGE_EXTENSIONS

TABLE_EXTENSIONS = (".jsonl", ".csv", ".parquet")
LABEL_COLUMN = "label"
_EXAMPLE = '{"file_name": "scenes/0001.png", "text": "<SAR> image of open water with a ship"}'


class DataError(ValueError):
    """A data folder or caption table that cannot be used; names the file and the fix."""


@dataclass(frozen=True)
class Record:
    """One training example before decoding.

    `name` is the image's name as the table gives it (relative path, or for embedded bytes the
    struct's path or ``<table>[row i]``): the train/val split key and what errors show.
    `texts`: with several caption columns, every candidate in `data.text_column`'s order
    (training picks one per epoch, `dataset.epoch_caption`); `text` is the fixed one of them
    (validation, reference prompts). Empty with one caption column.
    """

    path: str | None  # absolute image path; None when the table holds the bytes
    image_bytes: bytes | None  # encoded image; decoded in preference to `path` when both are set
    text: str
    label: str | None = None
    name: str = ""
    texts: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """Where the image comes from, for messages."""
        return self.path or self.name


def read_table(
    path: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    image_column: str = "file_name",
    text_column: str | list[str] = "text",
) -> list[Record]:
    """Records of every row of the caption table found from `path` (see module docstring).

    `text_column` may be a list of columns: each record carries all of them (`texts`) and, as
    `text`, the one a stable hash of its name picks (the same in every run)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"{root}: data path not found; pass a folder of images with metadata.jsonl, a "
            ".csv/.parquet caption file, or `synthetic`"
        )
    base = root if root.is_dir() else root.parent
    table = _find_table(root, captions)
    rows, columns = _load_rows(table)
    if not rows:
        raise DataError(f"{table}: caption table has no rows; add one row per image")
    from sar_ray.config import text_columns

    texts = list(text_columns(text_column))
    for col, key in [(image_column, "image_column")] + [(t, "text_column") for t in texts]:
        if col not in columns:
            raise DataError(
                f"{table}: no column {col!r} (columns: {', '.join(map(str, columns))}); rename "
                f"it or set data.{key}"
            )
    records = [
        _record(row, i, table, base, image_column, texts) for i, row in enumerate(rows)
    ]
    missing = [r.name for r in records if r.path is not None and not os.path.isfile(r.path)]
    if missing:
        shown = ", ".join(missing[:5])
        raise DataError(
            f"{table}: {len(missing)} of {len(records)} rows name images that do not exist under "
            f"{base} (first: {shown}); fix the {image_column!r} column or remove those rows"
        )
    return records


def _find_table(root: Path, captions: str | os.PathLike | None) -> Path:
    if captions is not None:
        cap = Path(captions).expanduser()
        if not cap.is_absolute():
            cap = (root if root.is_dir() else root.parent) / cap
        if not cap.is_file():
            raise DataError(f"{cap}: caption file not found (data.captions); give an existing "
                            ".jsonl/.csv/.parquet file")
        return cap
    if root.is_file():
        if root.suffix.lower() not in TABLE_EXTENSIONS:
            raise DataError(
                f"{root}: not a caption table; data.path must be a folder or a "
                f"{'/'.join(TABLE_EXTENSIONS)} file"
            )
        return root
    meta = root / "metadata.jsonl"
    if meta.is_file():
        return meta
    tables = sorted(
        p for p in root.iterdir() if p.is_file() and p.suffix.lower() in TABLE_EXTENSIONS
    )
    if len(tables) == 1:
        return tables[0]
    if len(tables) > 1:
        raise DataError(
            f"{root}: several caption files ({', '.join(p.name for p in tables)}); choose one "
            "with data.captions"
        )
    has_images = any(
        f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(root) for f in files
    )
    if not has_images:
        raise DataError(
            f"{root}: folder is empty or has no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
            "caption file; point data.path at your image folder"
        )
    raise DataError(
        f"{root}: images but no caption file; add {root / 'metadata.jsonl'} with one line per "
        f"image, e.g. {_EXAMPLE}"
    )


def _load_rows(table: Path) -> tuple[list[dict[str, Any]], list[str]]:
    suffix = table.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(table, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{table}:{n}: not valid JSON ({e.msg}); expected e.g. {_EXAMPLE}"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{table}:{n}: expected a JSON object, e.g. {_EXAMPLE}")
                rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return rows, columns
    if suffix == ".csv":
        import pandas as pd

        try:
            # dtype=str and no NA parsing: a caption "NA" or "None" stays text.
            df = pd.read_csv(table, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            return [], []
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise DataError(f"{table}: not a readable CSV ({e})") from None
        return df.to_dict("records"), [str(c) for c in df.columns]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(table)
        except Exception as e:  # noqa: BLE001 - arrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{table}: not a readable Parquet file ({e})") from None
        return t.to_pylist(), list(t.column_names)
    raise DataError(f"{table}: unsupported caption file; use {', '.join(TABLE_EXTENSIONS)}")


def _record(
    row: dict[str, Any], i: int, table: Path, base: Path, image_column: str, texts: list[str]
) -> Record:
    where = f"{table.name}[row {i}]"
    value = row.get(image_column)
    record = _image(row, i, table, base, image_column, value, where)
    values = []
    for text_column in texts:
        text = row.get(text_column)
        if text is None:
            raise DataError(f"{table}: row {i} has no {text_column!r}; give every image a caption")
        values.append(str(text))
    if len(values) == 1:
        return replace(record, text=values[0])
    from sar_ray.data.dataset import image_key
    from sar_ray.data.webdataset import pick_text

    return replace(record, text=pick_text(values, image_key(record.name)), texts=tuple(values))


def _image(row: dict[str, Any], i: int, table: Path, base: Path, image_column: str, value, where: str) -> Record:
    text = ""
    label = row.get(LABEL_COLUMN)
    label = None if label is None or label == "" else str(label)
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return Record(None, bytes(value["bytes"]), str(text), label, value.get("path") or where)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Record(None, bytes(value), str(text), label, where)
    if not isinstance(value, str) or not value:
        raise DataError(f"{table}: row {i} has no image in column {image_column!r}")
    p = Path(value).expanduser()
    full = p if p.is_absolute() else base / p
    # abspath, not resolve(): keep symlinked data folders as the user named them.
    return Record(os.path.abspath(full), None, str(text), label, value)
