"""Datasets that never pass through the driver: WebDataset shards and Parquet tables that hold
the image bytes. Training sees the same rows as from a caption table (``dataset._to_dataset``
then ``dataset._prepare_batch``), so it does not care where the data came from.

    source = open_source(cfg)        # driver: list files, read the schema or the first samples
    scan = source.scan(cfg.max_images)   # Ray Data: every sample's name and problem, summed per
                                     # block; the driver gets counts and the bad names only
    source.rows(...)                 # Ray Data: {path, image_bytes, name, text, key} rows (+ texts:
                                     # every candidate caption, with several caption columns)

What the driver checks up front (exit 2 before Ray Data starts): the files exist and are
reachable, the columns / members exist, the JSON paths resolve and the arrays are images
(WebDataset: on the first samples; Parquet: in the footer). What only reading every row can
show (a sample without its member, a corrupt image) is found by the scan in Ray Data workers
and follows ``data.on_corrupt``.

The train/val split is the caption tables' (``dataset.split_records``): by a stable hash of each
image's name (WebDataset: the sample key, so moving a sample to another shard keeps its side;
Parquet: the image's path, or ``table.parquet[row i]``), with at least one image on each side.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np

from sar_ray.config import DataConfig
from sar_ray.data import webdataset as wds
from sar_ray.data.captions import LABEL_COLUMN, DataError
from sar_ray.data.io import ImageReadError, read_image_bytes
from sar_ray.data.storage import display, is_remote, list_files

SCAN_BATCH = 256  # scan rows per summary in a worker; the driver receives one row per read task


def stable_unit(name: str) -> float:
    """`name`'s stable hash in [0, 1): below val_fraction means validation."""
    from sar_ray.data.dataset import stable_hash

    return stable_hash(name) / 2**64


@dataclass(frozen=True)
class SplitRule:
    """Which side a name falls on: `dataset.split_records`' rule without the whole list."""

    val_fraction: float
    force_val: str | None = None  # the lowest hash, when no name fell below val_fraction
    force_train: str | None = None  # the highest, when every name did

    def in_val(self, name: str) -> bool:
        if self.val_fraction <= 0 or name == self.force_train:
            return False
        return name == self.force_val or stable_unit(name) < self.val_fraction


@dataclass
class Scan:
    """What the scan found: counts, and the names (and first message) of unusable samples."""

    n: int = 0  # samples scanned (after max_images)
    n_val: int = 0  # usable samples whose hash is below val_fraction
    bad: dict[str, str] = field(default_factory=dict)  # name -> display name of unusable samples
    first_error: str = ""
    lowest: tuple[float, str] = (2.0, "")  # (hash, name) of the usable sample with the lowest hash
    highest: tuple[float, str] = (-1.0, "")

    @property
    def n_good(self) -> int:
        return self.n - len(self.bad)

    def rule(self, val_fraction: float) -> tuple[SplitRule, int]:
        """The split rule and the number of validation samples it gives."""
        if val_fraction <= 0:
            return SplitRule(0.0), 0
        n_val, force_val, force_train = self.n_val, None, None
        if self.n_good >= 2 and n_val == 0:
            force_val, n_val = self.lowest[1], 1
        if n_val == self.n_good and self.n_good > 0:
            force_train, n_val = self.highest[1], n_val - 1
        return SplitRule(val_fraction, force_val, force_train), n_val


def _summarize(batch: dict[str, np.ndarray], val_fraction: float) -> dict[str, np.ndarray]:
    """One summary row of a batch of scan rows (name, where, error)."""
    out = Scan()
    for name, where, err in zip(batch["name"], batch["where"], batch["error"]):
        out.n += 1
        name, err = str(name), str(err)
        if err:
            out.bad[name] = str(where)
            out.first_error = out.first_error or err
            continue
        u = stable_unit(name)
        out.n_val += u < val_fraction
        out.lowest, out.highest = min(out.lowest, (u, name)), max(out.highest, (u, name))
    return _summary_row(out)


def _summary_row(scan: Scan) -> dict[str, np.ndarray]:
    return {
        "n": np.array([scan.n]), "n_val": np.array([scan.n_val]),
        "bad": _one(list(scan.bad)), "bad_where": _one(list(scan.bad.values())),
        "first_error": np.array([scan.first_error], dtype=object),
        "lo_u": np.array([scan.lowest[0]]), "lo_name": np.array([scan.lowest[1]], dtype=object),
        "hi_u": np.array([scan.highest[0]]), "hi_name": np.array([scan.highest[1]], dtype=object),
    }


def _one(value) -> np.ndarray:
    """A one-row object column holding `value` (np.array([[]]) would be 2-D)."""
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


def _fold(out: Scan, batch: dict[str, np.ndarray]) -> Scan:
    """`out` plus a batch of summary rows."""
    for i in range(len(batch["n"])):
        out.n += int(batch["n"][i])
        out.n_val += int(batch["n_val"][i])
        out.bad.update(zip(map(str, batch["bad"][i]), map(str, batch["bad_where"][i])))
        out.first_error = out.first_error or str(batch["first_error"][i])
        if batch["lo_name"][i]:
            out.lowest = min(out.lowest, (float(batch["lo_u"][i]), str(batch["lo_name"][i])))
        if batch["hi_name"][i]:
            out.highest = max(out.highest, (float(batch["hi_u"][i]), str(batch["hi_name"][i])))
    return out


def _merge(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A block of summary rows as one row."""
    return _summary_row(_fold(Scan(), batch))


def _collect(scan_rows, val_fraction: float) -> Scan:
    """Sum the scan's summaries on the driver. Each Ray task folds its rows' summaries into one
    row (`_merge`, on a whole block), so the driver receives one small row per read task (a shard,
    a Parquet file), whatever the number of rows: one summary per SCAN_BATCH rows cost the driver
    ~7 B a row to deserialize (an Arrow chunk per summary and column), 6.5 MiB at 100k rows."""
    summaries = scan_rows.map_batches(
        _summarize, fn_kwargs={"val_fraction": val_fraction}, batch_size=SCAN_BATCH, batch_format="numpy",
    ).map_batches(_merge, batch_size=None, batch_format="numpy")
    out = Scan()
    for batch in summaries.iter_batches(batch_size=None, batch_format="numpy"):
        _fold(out, batch)
    return out


# ------------------------------------------------------------------------------ sources


def open_source(cfg: DataConfig):
    """The streamed source `cfg.path` names, or None when it is a caption table of paths (or a
    folder) that `captions.read_table` reads on the driver."""
    path = str(cfg.path)
    if wds.is_webdataset(path):
        return WebDatasetSource(path, cfg)
    if is_remote(path):
        files, fs = list_files(path, (".tar", ".parquet"))
        if any(f.endswith(".tar") for f in files):
            return WebDatasetSource(path, cfg)
        if not files:
            raise DataError(f"{path}: no .tar shards or .parquet files under this prefix")
        return ParquetSource(path, cfg, files, fs)
    table = _parquet_table(cfg)
    if table is not None and _holds_bytes(table, cfg.image_column):
        import pyarrow.fs as pafs

        return ParquetSource(str(table), cfg, [str(table)], pafs.LocalFileSystem())
    return None


def _parquet_table(cfg: DataConfig):
    """The local Parquet caption table `cfg` names, if that is what it names."""
    from pathlib import Path

    from sar_ray.data.captions import _find_table

    root = Path(cfg.path).expanduser().absolute()
    if not root.exists():
        return None  # read_table says what is wrong
    try:
        table = _find_table(root, cfg.captions)
    except DataError:
        return None
    return table if table.suffix.lower() == ".parquet" else None


def _holds_bytes(table, image_column: str) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(table)
    except Exception:  # noqa: BLE001 - read_table reports an unreadable file
        return False
    if image_column not in schema.names:
        return False
    t = schema.field(image_column).type
    if pa.types.is_struct(t):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        return "bytes" in {f.name for f in t}
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


class WebDatasetSource:
    """WebDataset shards; rows via `ray.data.read_webdataset`."""

    def __init__(self, path: str, cfg: DataConfig):
        self.path = path
        self.spec = wds.Spec.of(cfg.image_column, cfg.text_column)
        self.shards, self.fs = wds.list_shards(path)
        self.text_members = wds.peek(self.shards[0], self.fs, self.spec)

    def scan(self, max_images: int | None, val_fraction: float) -> Scan:
        import ray.data

        ds = ray.data.from_items([{"shard": s} for s in self.shards], override_num_blocks=len(self.shards))
        rows = ds.flat_map(functools.partial(_scan_shard_rows, fs=self.fs, spec=self.spec,
                                             wanted=tuple(self.text_members)))
        if max_images is not None:
            rows = rows.limit(max_images)
        return _collect(rows, val_fraction)

    def rows(self, order_seed: int | None, max_images: int | None):
        shards = list(self.shards)
        if order_seed is not None and max_images is None:
            # A seeded shard order: a streamed epoch does not start with shard 0 in every trial.
            shards = [shards[i] for i in np.random.default_rng(order_seed).permutation(len(shards))]
        ds = wds.read_rows(shards, self.fs, self.spec, self.text_members)
        if max_images is not None:
            ds = ds.limit(max_images)
        return ds, functools.partial(_wds_rows, spec=self.spec, fs=self.fs), "numpy"


def _scan_shard_rows(item: dict, fs, spec: wds.Spec, wanted: tuple[str, ...]) -> list[dict]:
    where = display(item["shard"], fs)
    return [
        {"name": r["key"], "where": f"{where}:{r['key']}", "error": r["error"]}
        for r in wds.scan_shard(item["shard"], fs, spec, wanted)
    ]


def _wds_rows(batch: dict[str, np.ndarray], spec: wds.Spec, fs) -> list[tuple[str, dict]]:
    """(split name, row) of each sample of a read_webdataset batch."""
    out = []
    members = [c for c in batch if not c.startswith("__")]
    for i in range(len(batch["__key__"])):
        key, shard = str(batch["__key__"][i]), str(batch["__url__"][i])
        sample = {m: bytes(batch[m][i]) for m in members if isinstance(batch[m][i], (bytes, bytearray))}
        where = f"{display(shard, fs)}: sample {key}"
        try:
            texts = [wds.resolve_text(t, sample, where) for t in spec.texts]
        except wds.SampleError:
            texts = None  # the scan marked it bad
        out.append((key, {"image_bytes": sample.get(spec.image), "name": wds.sample_name(shard, fs, key),
                          "texts": texts}))
    return out


class ParquetSource:
    """Parquet tables holding the image bytes; rows via `ray.data.read_parquet`."""

    def __init__(self, path: str, cfg: DataConfig, files: list[str], fs):
        import pyarrow.parquet as pq

        self.path, self.files, self.fs = path, files, fs
        self._datasets: dict[tuple[str, ...], object] = {}
        # Rows of an HF image struct with a path but no bytes name a file next to the table.
        self.base = None if is_remote(path) else os.path.dirname(os.path.abspath(files[0]))
        self.image_column, self.texts = cfg.image_column, list(cfg.text_columns)
        try:
            schema = pq.read_schema(files[0], filesystem=fs)
            self.n = sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError
            raise DataError(f"{display(files[0], fs)}: not a readable Parquet file ({' '.join(str(e).split())[:300]})") from None
        where = display(files[0], fs)
        if self.n == 0:
            raise DataError(f"{where}: caption table has no rows; add one row per image")
        for col, key in [(self.image_column, "image_column")] + [(t, "text_column") for t in self.texts]:
            if col not in schema.names:
                raise DataError(
                    f"{where}: no column {col!r} (columns: {', '.join(schema.names)}); rename it or set data.{key}"
                )
        self.columns = [self.image_column, *dict.fromkeys(self.texts)]
        if LABEL_COLUMN in schema.names and LABEL_COLUMN not in self.columns:
            self.columns.append(LABEL_COLUMN)

    def _read(self, order_seed: int | None = None):
        import ray.data

        files = list(self.files)
        if order_seed is not None and len(files) > 1:
            files = [files[i] for i in np.random.default_rng(order_seed).permutation(len(files))]
        if tuple(files) not in self._datasets:
            # One lazy dataset per file order, reused by the scan and both sides of the split:
            # creating one reads footers and samples the files (Ray tasks) each time.
            # include_row_hash: Ray's per-row hash of (file, row index), from which _row_names
            # recovers the row index that names an image without a path (`t.parquet[row 7]`).
            self._datasets[tuple(files)] = ray.data.read_parquet(
                files, filesystem=self.fs, columns=self.columns, include_paths=True, include_row_hash=True)
        return self._datasets[tuple(files)]

    def scan(self, max_images: int | None, val_fraction: float) -> Scan:
        ds = self._read()
        if max_images is not None:
            ds = ds.limit(max_images)
        rows = ds.map_batches(functools.partial(_parquet_scan_batch, image=self.image_column, texts=self.texts,
                                                base=self.base),
                              batch_format="pyarrow", batch_size=64)
        return _collect(rows, val_fraction)

    def rows(self, order_seed: int | None, max_images: int | None):
        ds = self._read(order_seed if max_images is None else None)
        if max_images is not None:
            ds = ds.limit(max_images)
        return ds, functools.partial(_parquet_rows, image=self.image_column, texts=self.texts, base=self.base), "pyarrow"


def _parquet_rows(batch, image: str, texts: list[str], base: str | None = None) -> list[tuple[str, dict]]:
    """(split name, row) of each row of a pyarrow batch of a Parquet caption table."""
    import pyarrow as pa

    col = batch.column(image)
    if pa.types.is_struct(col.type):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        data = col.combine_chunks().field("bytes").to_pylist() if "bytes" in {f.name for f in col.type} else [None] * len(col)
        paths = col.combine_chunks().field("path").to_pylist() if "path" in {f.name for f in col.type} else [None] * len(col)
    else:
        data, paths = col.to_pylist(), [None] * len(col)
    names = _row_names(batch.column("path").to_pylist(), batch.column("row_hash").to_numpy())
    text_cols = [batch.column(t).to_pylist() for t in texts]
    out = []
    for i, (b, p, n) in enumerate(zip(data, paths, names)):
        row_texts = [c[i] for c in text_cols]
        name = p or n
        path = os.path.join(base, p) if b is None and p and base else None  # abspath of a relative path
        out.append((name, {"image_bytes": b, "path": path, "name": name,
                           "texts": None if any(t is None for t in row_texts) else [str(t) for t in row_texts]}))
    return out


def _parquet_scan_batch(batch, image: str, texts: list[str], base: str | None = None) -> dict[str, np.ndarray]:
    from sar_ray.data.io import read_image

    names, wheres, errors = [], [], []
    for name, row in _parquet_rows(batch, image, texts, base):
        err = ""
        if row["texts"] is None:
            err = f"{name}: no caption in {', '.join(map(repr, texts))}; give every image a caption"
        else:
            try:
                if row["path"] is not None:
                    read_image(row["path"])
                else:
                    read_image_bytes(row["image_bytes"], name)
            except ImageReadError as e:
                err = str(e)
        names.append(name)
        wheres.append(name)
        errors.append(err)
    return {"name": np.asarray(names, dtype=object), "where": np.asarray(wheres, dtype=object),
            "error": np.asarray(errors, dtype=object)}


# splitmix64's finalizer, inverted: Ray's row_hash is mix(md5(path)[:8] + row index).
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_INV1, _INV2 = pow(_M1, -1, 2**64), pow(_M2, -1, 2**64)


def _unshift(x: np.ndarray, s: int) -> np.ndarray:
    out = x.copy()
    for _ in range(64 // s):
        out = x ^ (out >> np.uint64(s))
    return out


def _row_names(paths: list[str], row_hash: np.ndarray) -> list[str]:
    """``table.parquet[row i]`` of each row (as `captions.read_table` names it)."""
    import hashlib

    z = np.asarray(row_hash, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _unshift(z, 31) * np.uint64(_INV2)
        z = _unshift(z, 27) * np.uint64(_INV1)
        z = _unshift(z, 30)
    out = []
    for p, v, h in zip(paths, z, row_hash):
        seed = int.from_bytes(hashlib.md5(p.encode()).digest()[:8], "little")
        i = (int(v) - seed) % 2**64
        base = os.path.basename(p)
        # A row index beyond any table means Ray hashes rows another way: name by the hash.
        out.append(f"{base}[row {i}]" if i < 2**40 else f"{base}[row #{int(h):016x}]")
    return out


def with_rows(batch, to_rows, bad: frozenset, rule: SplitRule, want_val: bool, prefix: str | None,
              multi: bool = False) -> dict:
    """The rows of `batch` on one side of the split, minus the bad ones, as `_to_dataset` makes them;
    `multi` (several caption columns): with the `texts` column too."""
    from sar_ray.data.dataset import caption_lists, image_key, with_prefix
    from sar_ray.data.webdataset import pick_text

    keep = []
    for split_name, row in to_rows(batch):
        if split_name in bad or row["texts"] is None or (row["image_bytes"] is None and not row.get("path")):
            continue
        if rule.in_val(split_name) != want_val:
            continue
        key = image_key(split_name)
        texts = [with_prefix(t, prefix) for t in row["texts"]]
        keep.append({"path": row.get("path"), "image_bytes": row["image_bytes"], "name": row["name"],
                     "text": pick_text(texts, key), "texts": texts, "key": key})
    out = {
        "path": np.asarray([r["path"] for r in keep], dtype=object),
        "image_bytes": np.asarray([r["image_bytes"] for r in keep], dtype=object),
        "name": np.asarray([r["name"] for r in keep], dtype=object),
        "text": np.asarray([r["text"] for r in keep], dtype=object),
        "key": np.asarray([r["key"] for r in keep], dtype=np.int64),
    }
    if multi:  # several caption columns: every candidate travels (see dataset._to_dataset)
        out["texts"] = caption_lists([r["texts"] for r in keep])
    return out
