"""Ray Data datasets of training examples: rows of ``pixel_values``, ``text``, ``path``.

    data = build_datasets(cfg.data, seed=cfg.train.seed)
    data.train   # ray.data.Dataset: pixel_values (1, R, R) uint16 (the [0, 1] image in 65535
                 # steps), text, path, original_size (h, w) and crop_top_left (top, left) for SDXL
                 # micro-conditioning; with several caption columns also texts (every candidate)
                 # and key (the image's stable hash), from which the step picks one per epoch

On the driver: read the caption table, cap at ``max_images``, check every image decodes (a
Ray Data pass that returns only failures, so it runs on the cluster's CPUs), split train/val
by a hash of each image's name (``splits``: train, validation, held out). In Ray Data
workers: decode, normalise, resize, crop.
Pixels travel lean, one channel of uint16 (2 bytes a pixel; the model's (3, R, R) float32 in
[-1, 1] would be 12): the object store, the workers' in-memory shards and the copy to the device
all move a sixth of it, and `train.model_pixels` makes the model's input on the device. A step
is 2/65535 (3e-5) in the model's range, finer than the fp16 or bf16 the VAE often runs in.
WebDataset shards and Parquet tables holding the image bytes never reach the driver: see
``streamed`` (a scan in Ray Data, then the same rows and the same preparation).

Augmentations that must change every epoch (``flip``, ``caption_dropout``, the choice among
several captions: ``epoch_caption``) are not applied here: rows are a deterministic function of
(file, seed), so those belong in the training step. ``text`` is the fixed choice (a hash of the
image's name), what validation reads.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from sar_ray.config import DataConfig, NormalizationConfig
from sar_ray.data.captions import TABLE_EXTENSIONS, DataError, Record, read_table
from sar_ray.data.io import IMAGE_EXTENSIONS, ImageReadError, read_pixels, read_pixels_bytes
from sar_ray.data.normalize import DepthError, check_depth, normalize
from sar_ray.data.synth import synthetic_path

if TYPE_CHECKING:  # ray is imported only by build_datasets: metrics code needs no Ray
    import ray.data

ROWS_PER_BLOCK = 64  # input block size: 300k images -> ~5k blocks, 1000 -> 16
PIXEL_DTYPE = np.uint16  # pixel_values: round(img01 * 65535), one channel (see the module docstring)


@dataclass
class TrainData:
    """The datasets of one trial and what went into them."""

    train: ray.data.Dataset
    val: ray.data.Dataset | None
    n_train: int
    n_val: int
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # sources of the corrupt images left out
    source: str = ""  # the resolved data path
    materialized: bool = False  # prepared rows already in the object store (no ingest CPUs needed)
    # The text-embedding cache's table (`data.cache.open_text`) where it feeds the trial, else None.
    text_embeds: dict | None = None
    # False: n_train / n_val are upper bounds. A streamed scan with data.on_corrupt=skip reads
    # headers only; an image that does not decode is skipped in preparation (a worker warning).
    counts_exact: bool = True


MATERIALIZE_BUDGET = 2 * 1024**3  # data.materialize=auto keeps prepared sets under this in memory


def build_datasets(cfg: DataConfig, seed: int) -> TrainData:
    """Train (and val) datasets for `cfg`; corrupt images fail or are skipped before training."""
    import ray.data
    from ray.data.dataset import MaterializedDataset

    # Row order must be the same every run: resuming skips the rows already consumed, and a
    # seeded shuffle downstream only reproduces if its input order is fixed. from_items copies
    # this context into the datasets; Ray Train's default DataConfig reads it when the trainer
    # is built, so the training ingest keeps order too.
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    if cfg.path != "synthetic":
        from sar_ray.data.streamed import open_source

        streamed = open_source(cfg)  # WebDataset shards, Parquet with image bytes, s3://
        if streamed is not None:
            return _build_streamed(cfg, seed, streamed)
    if cfg.path == "synthetic":
        source = synthetic_path(cfg.synthetic)
        records = read_table(source)
        # Embed the (small) encoded scenes: on a multi-node cluster the workers cannot see
        # the driver's cache folder.
        records = [replace(r, image_bytes=Path(r.path).read_bytes()) for r in records]
    else:
        source = Path(cfg.path).expanduser().absolute()
        records = read_table(source, cfg.captions, cfg.image_column, cfg.text_column)
    if cfg.max_images is not None:
        records = records[: cfg.max_images]

    bad = _find_unreadable(records, cfg.normalization)
    if bad and cfg.on_corrupt == "error":
        first = bad[min(bad)]  # the first in table order
        raise ImageReadError(
            f"{first} ({len(bad)} of {len(records)} images in {source} unreadable; set "
            "data.on_corrupt=skip to leave them out)"
        )
    skipped = [records[i].source for i in sorted(bad)]
    if len(bad) == len(records):
        why = f" (all {len(skipped)} unreadable, first: {bad[min(bad)]})" if skipped else ""
        raise DataError(f"{source}: no usable images{why}")

    # Train / validation / held out: sar_ray.data.splits defines them (the held-out images are
    # the sweep's `real (held out)` anchor: never trained on). Split every record, as the
    # sweep's study_splits does, and only then leave the unreadable ones out: on a small set the
    # split's fallbacks depend on which records take part, so splitting the readable ones alone
    # could train on the image the sweep scores as held out.
    from sar_ray.data.splits import split_three

    unreadable = {id(records[i]) for i in bad}
    train_recs, val_recs, _ = (
        [r for r in part if id(r) not in unreadable]
        for part in split_three(records, cfg.val_fraction, cfg.holdout_fraction))
    if not train_recs:
        raise DataError(f"{source}: none of its training images is readable ({len(skipped)} unreadable, first: "
                        f"{bad[min(bad)]}); fix or remove them")
    # A seeded global order: each worker's shard (and an early-stopped trial's first steps)
    # is a random sample of the whole table, never its first rows (one class, one site).
    train_recs = [train_recs[i] for i in np.random.default_rng(seed).permutation(len(train_recs))]
    prep = functools.partial(
        _prepare_batch, norm=cfg.normalization, resolution=cfg.resolution, seed=seed
    )
    train = _to_dataset(train_recs, cfg.caption_prefix).map_batches(
        functools.partial(prep, crop=cfg.crop), batch_format="numpy",
        batch_size=_batch_size(cfg.resolution),
    )
    val = None
    if val_recs:
        # Validation always center-crops: the val loss must compare across trials and steps.
        val = _to_dataset(val_recs, cfg.caption_prefix).map_batches(
            functools.partial(prep, crop="center"), batch_format="numpy",
            batch_size=_batch_size(cfg.resolution),
        )
    if _materialize(cfg, len(train_recs) + len(val_recs)):
        # Prepare once, now, while every CPU is free: training workers reserve their CPUs, and
        # a streaming ingest on a small machine (2 CPUs, 2 workers) would have none left.
        # It also spares re-decoding every image each epoch.
        train = train.materialize()
        val = val.materialize() if val is not None else None
    return TrainData(train, val, len(train_recs), len(val_recs), len(skipped), skipped, str(source),
                     materialized=isinstance(train, MaterializedDataset))


def _materialize(cfg: DataConfig, n: int) -> bool:
    prepared_bytes = n * cfg.resolution**2 * np.dtype(PIXEL_DTYPE).itemsize  # uint16 (1, R, R)
    return cfg.materialize == "always" or (cfg.materialize == "auto" and prepared_bytes <= MATERIALIZE_BUDGET)


def _build_streamed(cfg: DataConfig, seed: int, source) -> TrainData:
    """`build_datasets` for data the driver never holds (see `streamed`): a scan in Ray Data
    counts the samples and finds the unusable ones, then the same preparation as above."""
    from ray.data.dataset import MaterializedDataset

    from sar_ray.data.streamed import with_rows

    scan = source.scan(cfg.max_images, cfg.val_fraction)
    if scan.n == 0:
        raise DataError(f"{source.path}: empty dataset (no samples); point data.path at your data")
    if scan.bad and cfg.on_corrupt == "error":
        raise ImageReadError(
            f"{scan.first_error} ({len(scan.bad)} of {scan.n} images in {source.path} unusable; set "
            "data.on_corrupt=skip to leave them out)"
        )
    if not scan.n_good:
        raise DataError(f"{source.path}: no usable images (all {scan.n} unusable, first: {scan.first_error})")
    rule, n_val = scan.rule(cfg.val_fraction)
    bad = frozenset(scan.bad)
    materialize = _materialize(cfg, scan.n_good)
    prep = functools.partial(
        _prepare_batch, norm=cfg.normalization, resolution=cfg.resolution, seed=seed,
        skip_unreadable=cfg.on_corrupt == "skip",
    )

    def side(want_val: bool, crop: str):
        ds, to_rows, fmt = source.rows(seed, cfg.max_images)
        ds = ds.map_batches(
            with_rows, fn_kwargs={"to_rows": to_rows, "bad": bad, "rule": rule, "want_val": want_val,
                                  "prefix": cfg.caption_prefix, "multi": len(cfg.text_columns) > 1},
            batch_format=fmt, batch_size=ROWS_PER_BLOCK,
        ).map_batches(functools.partial(prep, crop=crop), batch_format="numpy",
                      batch_size=_batch_size(cfg.resolution))
        # The order is the shards' (or Parquet files') in a seeded permutation: a worker's part
        # of the data spans many shards, never the first ones only; within a shard, tar order.
        return ds.materialize() if materialize else ds

    train = side(False, cfg.crop)
    # Validation always center-crops: the val loss must compare across trials and steps.
    val = side(True, "center") if n_val else None
    skipped = sorted(scan.bad.values())
    n_train, n_skipped, exact = scan.n_good - n_val, len(skipped), cfg.on_corrupt != "skip"
    if not exact and isinstance(train, MaterializedDataset):
        # Prepared already: count the rows there (what did not decode is gone; its name is in the log).
        n_rows = (train.count(), val.count() if val is not None else 0)
        n_skipped += n_train + n_val - sum(n_rows)
        (n_train, n_val), exact = n_rows, True
    return TrainData(train, val, n_train, n_val, n_skipped, skipped, str(source.path),
                     materialized=isinstance(train, MaterializedDataset), counts_exact=exact)


def stable_hash(name: str) -> int:
    """A 64-bit hash of `name`, the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big")


def image_key(name: str) -> int:
    """An image's row key (its name's stable hash, 63 bits so it fits an int64 column): what
    the fixed and the per-epoch caption choices hash, in every reader."""
    return stable_hash(name) >> 1


def epoch_caption(texts, key: int, epoch: int, seed: int) -> str:
    """The caption, of an image's candidates `texts`, that training uses in `epoch`: a stable
    hash of (the image's `key`, epoch, train.seed), so it changes across epochs, a resume picks
    the same one, and it depends on neither the worker nor the row order."""
    return str(texts[stable_hash(f"{int(key)}:{int(epoch)}:{int(seed)}") % len(texts)])


def split_records(records: list[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, val) by the hash of each record's name; table order kept within each part.

    A file stays on its side when images are added or removed, and the split does not depend
    on the seed, so every trial of a study validates on the same images. With
    val_fraction > 0 and at least 2 images, val holds at least one and train keeps one.
    """
    if val_fraction <= 0:
        return list(records), []
    u = [stable_hash(r.name) / 2**64 for r in records]
    in_val = [x < val_fraction for x in u]
    if len(records) >= 2 and not any(in_val):
        in_val[min(range(len(u)), key=u.__getitem__)] = True
    if all(in_val):
        in_val[max(range(len(u)), key=u.__getitem__)] = False
    train = [r for r, v in zip(records, in_val) if not v]
    val = [r for r, v in zip(records, in_val) if v]
    return train, val


def with_prefix(text: str, prefix: str | None) -> str:
    """`text` with `prefix` in front unless it already starts with it."""
    if not prefix or text.startswith(prefix):
        return text
    return f"{prefix} {text}".rstrip()


def load_folder_arrays(
    path: str | os.PathLike,
    cfg: NormalizationConfig | None = None,
    resolution: int | None = None,
) -> tuple[list[np.ndarray], list[Record]]:
    """Every image of a small folder as (H, W) float32 [0, 1] arrays, without Ray.

    The folder may have a caption table (then its rows, in order) or just images (sorted
    paths, empty captions). `cfg` None: no SAR normalisation, only scaling to [0, 1] (method
    `none`, right for generated samples); a config: what training applies. `resolution`: the
    same shorter-side resize and center crop as training; None keeps the native size.
    """
    root = Path(path).expanduser().absolute()
    if root.is_dir() and not _has_table(root):
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        records = [Record(str(p), None, "", None, str(p.relative_to(root))) for p in files]
    else:
        records = read_table(root)
    norm = cfg or NormalizationConfig(method="none")
    arrays = []
    for r in records:
        pixels, bits = _decode(r)
        arrays.append(prepare_image(pixels, norm, resolution, bits=bits, name=r.name or r.path))
    return arrays, records


def prepare_image(
    pixels: np.ndarray,
    norm: NormalizationConfig,
    resolution: int | None,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    bits: int | None = None,
    name: str = "",
) -> np.ndarray:
    """Linear pixels -> normalised [0, 1] (R, R): shorter side resized to R, then cropped.
    `bits`: the stored depth `io.read_pixels` gave (see `normalize`); `name`: the image, for errors."""
    return prepare_image_geometry(pixels, norm, resolution, crop, rng, bits, name)[0]


def prepare_image_geometry(
    pixels: np.ndarray,
    norm: NormalizationConfig,
    resolution: int | None,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    bits: int | None = None,
    name: str = "",
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`prepare_image` plus what SDXL's micro-conditioning needs: the original (h, w) before
    resizing and the crop's (top, left) in the resized image."""
    img = normalize(pixels, norm, bits, name)  # per-scene statistics on the full image, before resizing
    original = (int(img.shape[0]), int(img.shape[1]))
    if resolution is None:
        return img, original, (0, 0)
    h, w = img.shape
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))  # PIL: (W, H)
    if size != (w, h):
        # PIL's filters widen with the scale factor when downsizing (antialiased); a float32
        # array becomes mode "F", so no 8-bit rounding. Bicubic overshoots: clip to [0, 1].
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))
        img = np.clip(img, 0.0, 1.0)
    h, w = img.shape
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        top = int(rng.integers(0, h - resolution + 1))
        left = int(rng.integers(0, w - resolution + 1))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    out = np.ascontiguousarray(img[top : top + resolution, left : left + resolution], np.float32)
    return out, original, (top, left)


def to_pixel_values(img01: np.ndarray) -> np.ndarray:
    """A prepared (R, R) image in [0, 1] -> the (1, R, R) uint16 row `pixel_values` holds,
    round(img01 * 65535); `train.model_pixels` maps it back to the model's [-1, 1]."""
    scale = np.iinfo(PIXEL_DTYPE).max
    return np.round(np.asarray(img01, np.float32)[None] * scale).astype(PIXEL_DTYPE)


# --------------------------------------------------------------------------------------------
# Ray Data pieces
# --------------------------------------------------------------------------------------------


def _to_dataset(records: list[Record], prefix: str | None) -> ray.data.Dataset:
    import ray.data

    items = [
        {
            "path": r.path,
            "image_bytes": r.image_bytes,
            "name": r.name,
            "text": with_prefix(r.text, prefix),
            # uint64 does not fit Arrow's int64 column; the crop RNG is seeded from this.
            "key": image_key(r.name),
        }
        for r in records
    ]
    if any(r.texts for r in records):  # several caption columns: every candidate travels
        for item, r in zip(items, records):
            item["texts"] = [with_prefix(t, prefix) for t in r.texts]
    return ray.data.from_items(items, override_num_blocks=_num_blocks(len(items)))


def _num_blocks(n: int) -> int:
    return max(1, math.ceil(n / ROWS_PER_BLOCK))


def _batch_size(resolution: int) -> int:
    # Keep an output batch near 64 MB: a (1, 1024, 1024) uint16 row is 2 MB (at most 64 rows).
    row_bytes = np.dtype(PIXEL_DTYPE).itemsize * resolution * resolution
    return int(np.clip((64 << 20) // row_bytes, 1, 64))


def _decode(r: Record | dict) -> tuple[np.ndarray, int | None]:
    """(linear pixels, stored bit depth) of a record or a row (see `io.read_pixels`)."""
    if isinstance(r, Record):
        data, path, name = r.image_bytes, r.path, r.name
    else:
        data, path, name = _cell(r["image_bytes"], bytes), _cell(r["path"], str), r["name"]
    if data is not None:
        return read_pixels_bytes(data, path or name)
    if not os.path.exists(path):
        # read_table saw it on the driver: this worker runs on another machine.
        raise ImageReadError(
            f"{path}: not found on node {socket.gethostname()}; on a cluster data.path must be "
            "on storage every node mounts (NFS, a shared disk)"
        )
    return read_pixels(path)


def _cell(value, kind: type):
    # Ray Data turns an all-null Arrow column into float NaN in numpy batches (and bytes(NaN)
    # would be 4 bytes of garbage): anything not of the expected type is "absent".
    return value if isinstance(value, kind) else None


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]


def _check_batch(batch: dict[str, np.ndarray], norm: NormalizationConfig | None = None) -> dict[str, np.ndarray]:
    """Decode each image; return only the failures as (index, error, depth): `depth` marks an
    image that contradicts `data.normalization.bits` (see `normalize.check_depth`)."""
    index, errors, depth = [], [], []
    for row in _rows(batch):
        try:
            pixels, bits = _decode(row)
            if norm is not None:
                check_depth(pixels, bits, norm, _cell(row["path"], str) or row["name"])
        except (ImageReadError, DepthError) as e:
            index.append(int(row["index"]))
            errors.append(str(e))
            depth.append(isinstance(e, DepthError))
    return {"index": np.asarray(index, np.int64), "error": np.asarray(errors, dtype=object),
            "depth": np.asarray(depth, bool)}


def _find_unreadable(records: list[Record], norm: NormalizationConfig | None = None) -> dict[int, str]:
    """{record index: error} for every image that does not decode (one Ray Data pass). An image
    that contradicts `norm.bits` raises :class:`DepthError` (with a count) instead: a config
    mistake, which `data.on_corrupt=skip` must not turn into a dropped image."""
    import ray.data

    items = [
        {"index": i, "path": r.path, "image_bytes": r.image_bytes, "name": r.name}
        for i, r in enumerate(records)
    ]
    ds = ray.data.from_items(items, override_num_blocks=_num_blocks(len(items)))
    bad = ds.map_batches(_check_batch, fn_kwargs={"norm": norm}, batch_format="numpy", batch_size=ROWS_PER_BLOCK)
    rows = sorted(bad.take_all(), key=lambda row: int(row["index"]))
    depth = [str(row["error"]) for row in rows if bool(row["depth"])]
    if depth:
        raise DepthError(f"{depth[0]} ({len(depth)} of {len(records)} images)")
    return {int(row["index"]): str(row["error"]) for row in rows}


def _prepare_batch(
    batch: dict[str, np.ndarray],
    norm: NormalizationConfig,
    resolution: int,
    seed: int,
    crop: str,
    skip_unreadable: bool = False,
) -> dict[str, np.ndarray]:
    """`skip_unreadable`: drop rows whose image does not decode (streamed data, whose scan
    reads headers only) rather than fail the epoch."""
    pixels, originals, crops, texts, names, candidates, keys = [], [], [], [], [], [], []
    for row in _rows(batch):
        # The crop position depends on (seed, file) only: the same rows every run and epoch.
        rng = np.random.default_rng([seed % 2**63, int(row["key"])]) if crop == "random" else None
        try:
            pixels_in, bits = _decode(row)
            img, original, top_left = prepare_image_geometry(
                pixels_in, norm, resolution, crop, rng, bits, _cell(row["path"], str) or row["name"])
        except ImageReadError as e:
            if not skip_unreadable:
                raise
            logging.getLogger(__name__).warning("skipped unreadable image: %s", e)
            continue
        pixels.append(to_pixel_values(img))  # (1, R, R) uint16
        originals.append(original)
        crops.append(top_left)
        texts.append(row["text"])
        names.append(_cell(row["path"], str) or row["name"])
        if "texts" in row:
            candidates.append(row["texts"])
            keys.append(int(row["key"]))
    out = {
        "pixel_values": np.stack(pixels) if pixels
        else np.zeros((0, 1, resolution, resolution), PIXEL_DTYPE),  # (B, 1, R, R) uint16
        "text": np.asarray(texts, dtype=object),
        "path": np.asarray(names, dtype=object),
        "original_size": np.asarray(originals, np.int32).reshape(-1, 2),  # (B, 2): h, w before resizing
        "crop_top_left": np.asarray(crops, np.int32).reshape(-1, 2),  # (B, 2): top, left in the resized image
    }
    if "texts" in batch:  # several captions: all of them, and the key that picks one per epoch
        out["texts"] = caption_lists(candidates)
        out["key"] = np.asarray(keys, np.int64)
    return out


def caption_lists(rows) -> np.ndarray:
    """(B,) object array of lists of str, which Ray Data stores as an Arrow ``list<string>``
    column (a batch of it reads back as arrays of str; a 2-D array would become a tensor)."""
    out = np.empty(len(rows), dtype=object)
    for i, texts in enumerate(rows):
        out[i] = [str(t) for t in texts]
    return out


def _has_table(folder: Path) -> bool:
    return (folder / "metadata.jsonl").is_file() or any(
        p.is_file() and p.suffix.lower() in TABLE_EXTENSIONS for p in folder.iterdir()
    )
