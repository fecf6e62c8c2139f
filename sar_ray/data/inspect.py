"""What a dataset holds, before training on it (``sar-ray data inspect PATH``).

    info = inspect_data("/data/sarlo80/shard-{000000..000519}.tar", sample=64)
    info.count, info.members, info.caption_keys, info.amplitude   # plain values; cli prints them

Counts and member / column names come from every file (WebDataset: tar headers and JSON
members only); image shapes, dtypes and amplitude statistics from a seeded sample of
`sample` images, decoded as training decodes them (complex SLC -> |s|, before normalisation).
Unusable input raises :class:`DataError` (one line, the CLI exits 2). No Ray: a laptop can
look at a bucket.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sar_ray.data import webdataset as wds
from sar_ray.data.captions import TABLE_EXTENSIONS, DataError
from sar_ray.data.io import IMAGE_EXTENSIONS, ImageReadError, probe_image_bytes, read_pixels_bytes
from sar_ray.data.storage import display, is_remote, list_files

PIXELS_PER_IMAGE = 1 << 16  # amplitude statistics: a seeded subsample of each image's pixels
PERCENTILES = (1, 5, 50, 95, 99)


@dataclass
class Inspection:
    """What `inspect_data` found; every field is plain data."""

    path: str
    kind: str  # "webdataset" | "table" | "folder"
    count: int  # samples / rows / images
    files: int  # shards, tables or image files read
    members: dict[str, int] = field(default_factory=dict)  # member suffix or column -> samples having it
    shapes: dict[str, dict[str, int]] = field(default_factory=dict)  # image member -> "HxW dtype" -> n (sampled)
    caption_keys: dict[str, dict[str, float]] = field(default_factory=dict)  # JSON path / column -> length stats
    amplitude: dict[str, float] = field(default_factory=dict)  # mean, std, min, max, p1..p99 of |s| or A
    amplitude_member: str | None = None
    sampled: int = 0
    problems: list[str] = field(default_factory=list)  # first few images that did not decode
    notes: list[str] = field(default_factory=list)  # what to set before training on it (one line each)


def inspect_data(path: str, sample: int = 64, seed: int = 0, image_column: str | None = None) -> Inspection:
    """Inspect a WebDataset (file, folder, brace pattern, s3:// prefix), a caption table or a
    folder of images; `image_column` chooses the image member or column (default: found)."""
    if sample < 0:
        raise DataError(f"--sample must be >= 0 (got {sample})")
    p = str(path)
    if wds.is_webdataset(p) or (is_remote(p) and any(f.endswith(".tar") for f in list_files(p, (".tar",))[0])):
        return _inspect_webdataset(p, sample, seed, image_column)
    if is_remote(p):
        raise DataError(f"{p}: no .tar shards under this prefix (inspect reads WebDataset from object storage)")
    return _inspect_local(Path(p).expanduser().absolute(), sample, seed, image_column)


# ------------------------------------------------------------------------------ WebDataset


def _inspect_webdataset(path: str, n_sample: int, seed: int, image_column: str | None) -> Inspection:
    shards, fs = wds.list_shards(path)
    with ThreadPoolExecutor(max_workers=8) as pool:  # object storage: latency, not CPU, bounds a header walk
        per_shard = list(pool.map(lambda s: _walk_shard(s, fs), shards))
    members, lengths, index = Counter(), defaultdict(list), []
    for shard, (m, lens, samples) in zip(shards, per_shard):
        members.update(m)
        for k, v in lens.items():
            lengths[k] += v
        index += [(shard, key, infos) for key, infos in samples]
    if not index:
        raise DataError(f"{path}: empty dataset (no samples in {len(shards)} shards)")
    member = image_column or _image_member(members)
    info = Inspection(display(path, fs) if is_remote(path) else path, "webdataset", len(index), len(shards),
                      dict(members.most_common()), caption_keys=_length_stats(lengths), amplitude_member=member)
    if member is None or n_sample == 0:
        return info
    if member not in members:
        raise DataError(f"{path}: no sample has member {member!r} (members: {', '.join(members)})")
    having = [x for x in index if member in x[2]]
    picks = np.random.default_rng(seed).choice(len(having), size=min(n_sample, len(having)), replace=False)
    images = []
    for i in sorted(picks):
        shard, key, infos = having[i]
        tinfo = infos[member]
        with wds._open(shard, fs, stream=False) as f:
            f.seek(tinfo.offset_data)
            images.append((f"{display(shard, fs)}:{key}.{member}", f.read(tinfo.size)))
    _describe_images(info, member, images, seed)
    return info


def _walk_shard(shard: str, fs):
    """(member counts, caption lengths per JSON path / text member, [(key, {member: TarInfo})])."""
    members, lengths, samples = Counter(), defaultdict(list), []
    where = display(shard, fs)
    with wds._open(shard, fs, stream=False) as f:
        for key, sample in wds.iter_samples(f, where, heads=True, full=_is_text):
            infos = sample.pop("__info__")
            members.update(infos.keys())
            for m, data in sample.items():
                if m.endswith("json"):
                    try:
                        doc = json.loads(data)
                    except ValueError:
                        continue
                    for p in wds.json_paths(doc):
                        v = _get(doc, p)
                        if isinstance(v, str):
                            lengths[p].append(len(v.split()))
                elif _is_text(m):
                    lengths[m].append(len(data.decode("utf-8", "replace").split()))
            samples.append((key, infos))
    return members, lengths, samples


def _is_text(member: str) -> bool:
    return member.endswith(("json", "txt", "text"))


def _get(doc, dotted: str):
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def _image_member(members: Counter) -> str | None:
    """The image member a SAR user most likely means: an SLC .npy first, then amplitude files."""
    return wds._first_image_member(members)


# ------------------------------------------------------------------------------ tables, folders


def _inspect_local(root: Path, n_sample: int, seed: int, image_column: str | None) -> Inspection:
    from sar_ray.data.captions import _find_table, read_table

    if not root.exists():
        raise DataError(f"{root}: not found; give a folder, a caption table, WebDataset shards or an s3:// prefix")
    has_table = root.is_file() or (root / "metadata.jsonl").is_file() or any(
        p.is_file() and p.suffix.lower() in TABLE_EXTENSIONS for p in root.iterdir()
    )
    if not has_table:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{root}: empty dataset (no images, caption table or .tar shards)")
        info = Inspection(str(root), "folder", len(files), len(files), {"image files": len(files)})
        picks = _picks(len(files), n_sample, seed)
        _describe_images(info, "image", [(str(files[i].relative_to(root)), files[i].read_bytes()) for i in picks], seed)
        return info
    table = _find_table(root, None)
    if table.suffix.lower() == ".parquet":
        return _inspect_parquet(table, n_sample, seed, image_column)
    image_column = image_column or "file_name"
    records = read_table(root, None, image_column, "text")
    info = Inspection(str(table), "table", len(records), 1, _columns(table),
                      caption_keys=_length_stats({"text": [len(r.text.split()) for r in records]}))
    picks = _picks(len(records), n_sample, seed)
    _describe_images(info, image_column, [(records[i].source, _bytes(records[i])) for i in picks], seed)
    return info


def _inspect_parquet(table: Path, n_sample: int, seed: int, image_column: str | None) -> Inspection:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(table)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{table}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    n = pf.metadata.num_rows
    if n == 0:
        raise DataError(f"{table}: empty dataset (the table has no rows)")
    image_column = image_column or next(
        (f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_struct(f.type)), "file_name")
    if image_column not in schema.names:
        raise DataError(f"{table}: no column {image_column!r} (columns: {', '.join(schema.names)}); pass --image-column")
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    lengths = defaultdict(list)
    for batch in pf.iter_batches(columns=strings, batch_size=4096):  # only the text columns
        for col in strings:
            lengths[col] += [len(str(v).split()) for v in batch.column(col).to_pylist() if v is not None]
    info = Inspection(str(table), "table", n, 1, {c: n for c in schema.names}, caption_keys=_length_stats(lengths))
    picks = set(_picks(n, n_sample, seed))
    images, offset = [], 0
    for batch in pf.iter_batches(columns=[image_column], batch_size=256):  # one batch of images at a time
        col = batch.column(0)
        for j in [i - offset for i in sorted(picks) if offset <= i < offset + len(col)]:
            v = col[j].as_py()
            data = v.get("bytes") if isinstance(v, dict) else v
            images.append((f"{table.name}[row {offset + j}]", data if isinstance(data, bytes) else _path_bytes(table, v)))
        offset += len(col)
    _describe_images(info, image_column, images, seed)
    return info


def _columns(table: Path) -> dict[str, int]:
    if table.suffix.lower() == ".jsonl":
        c = Counter()
        for line in table.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    c.update(json.loads(line))
                except (ValueError, TypeError):
                    pass
        return dict(c)
    import pandas as pd

    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    return {str(col): int((df[col] != "").sum()) for col in df.columns}


def _bytes(record) -> bytes | None:
    if record.image_bytes is not None:
        return record.image_bytes
    try:
        return Path(record.path).read_bytes()
    except OSError:
        return None


def _path_bytes(table: Path, value) -> bytes | None:
    p = value.get("path") if isinstance(value, dict) else value
    if not isinstance(p, str):
        return None
    full = Path(p) if os.path.isabs(p) else table.parent / p
    return full.read_bytes() if full.is_file() else None


# ------------------------------------------------------------------------------ statistics


def _picks(n: int, k: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False).tolist()) if n and k else []


def _describe_images(info: Inspection, member: str, images: list[tuple[str, bytes | None]], seed: int) -> None:
    """Shapes and dtypes (from the headers) and pooled amplitude statistics of `images`."""
    shapes, pixels, depths, peak = Counter(), [], set(), 0.0
    rng = np.random.default_rng(seed)
    for name, data in images:
        if not data:
            info.problems.append(f"{name}: not found or empty")
            continue
        try:
            shape, dtype = probe_image_bytes(data)
            amp, bits = read_pixels_bytes(data, name)  # linear values; complex -> |s|
        except ImageReadError as e:
            info.problems.append(str(e))
            continue
        shapes[f"{'x'.join(map(str, shape))} {dtype}"] += 1
        depths.add(bits)
        peak = max(peak, float(amp.max()) if amp.size else 0.0)  # every pixel's, not the subsample's
        flat = amp.ravel()
        pixels.append(flat if flat.size <= PIXELS_PER_IMAGE else rng.choice(flat, PIXELS_PER_IMAGE, replace=False))
    info.shapes = {member: dict(shapes.most_common())}
    info.sampled = len(pixels)
    if pixels:
        a = np.concatenate(pixels).astype(np.float64)
        info.amplitude = {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
        info.amplitude.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(a, PERCENTILES))})
        info.notes += _depth_notes(depths, peak)


def _depth_notes(depths: set[int | None], vmax: float) -> list[str]:
    """A hint when every sampled image stores 16-bit words but their values fit in fewer bits
    (12-bit sensor data in 16-bit PNGs): `normalization.method: none` would divide by 65535.
    `vmax`: the sampled images' largest pixel (a bright target is a few pixels of a scene)."""
    if depths != {16} or not vmax > 0:
        return []
    used = int(np.ceil(np.log2(vmax + 1)))
    if used > 14:
        return []
    return [f"16-bit samples whose largest sampled value is {vmax:g} ({used} bits): if they are {used}-bit data, "
            f"data.normalization.method=none needs data.normalization.bits={used} (else it divides by 65535); "
            "the other methods are scale-free"]


def _length_stats(lengths: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per caption key: how many have it and their length in words (min / mean / max)."""
    out = {}
    for k, v in lengths.items():
        if v:
            x = np.asarray(v)
            out[k] = {"n": int(x.size), "min": int(x.min()), "mean": float(x.mean()), "max": int(x.max())}
    return out
