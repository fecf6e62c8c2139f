"""The splits of a study's real images, defined here and nowhere else.

From one data source (``data.path``), by a stable hash ``u`` in [0, 1) of each image's name
(the same in every process, independent of ``train.seed``, so the seed replicas of
``search.repeats`` and every trial of a study see the same splits):

    validation   u < data.val_fraction                           validation loss (dataset.split_records)
    held out     val_fraction <= u < val_fraction + holdout_fraction
                                                                  the sweep's `real (held out)` anchor row
    train        the rest                                         what trials learn from
    reference    the train split (default), or search.reference  what every sample set is scored against

The held-out images are never trained on, never validated on and never in the reference: the
anchor row measures how far real SAR of the same source sits from the reference, the scale a
trial's distance is read against. An explicit ``search.reference`` or ``search.holdout`` folder
is checked against the others by image content (a copy under another name still overlaps):
an overlap is refused (:class:`SplitError`, exit 2).

WebDataset shards and streamed Parquet (``data.streamed``) split train/val by the sample key in
the scan; their held-out anchor comes from ``search.holdout`` only (their training data keeps
every non-validation sample).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sar_ray.data.captions import DataError, Record

HOLDOUT_DIR, REFERENCE_DIR = "holdout", "reference"


class SplitError(DataError):
    """Splits that would break the held-out guarantee (an overlap); exit 2."""


def unit_hash(name: str) -> float:
    """`name`'s position in [0, 1): the split key (dataset.stable_hash scaled)."""
    from sar_ray.data.dataset import stable_hash

    return stable_hash(name) / 2**64


def split_three(records: list[Record], val_fraction: float,
                holdout_fraction: float) -> tuple[list[Record], list[Record], list[Record]]:
    """(train, val, holdout); table order kept within each. Validation is exactly
    `dataset.split_records`' (so adding a holdout never moves a validation image); the
    held-out images come out of the rest, at least one where holdout_fraction > 0 and two or
    more images are left, and training keeps at least one."""
    from sar_ray.data.dataset import split_records

    rest, val = split_records(records, val_fraction)
    if holdout_fraction <= 0 or len(rest) < 2:
        return rest, val, []
    u = [unit_hash(r.name) for r in rest]
    lo, hi = max(val_fraction, 0.0), max(val_fraction, 0.0) + holdout_fraction
    held = [lo <= x < hi for x in u]
    if not any(held):  # a small set: the lowest hash above the validation range
        held[min(range(len(u)), key=u.__getitem__)] = True
    if all(held):
        held[max(range(len(u)), key=u.__getitem__)] = False
    train = [r for r, h in zip(rest, held) if not h]
    holdout = [r for r, h in zip(rest, held) if h]
    return train, val, holdout


def anchor_sample(holdout: list[Record], n: int) -> list[Record]:
    """`n` held-out images for the anchor row (lowest hash first: deterministic, and the same
    images when the set grows): as many as a trial generates, so the real row and the trials'
    rows meet the same small-sample bias of a set distance."""
    return sorted(holdout, key=lambda r: unit_hash(r.name))[:n]


def readable_sample(records: list[Record], n: int, on_corrupt: str = "skip") -> tuple[list[Record], list[str]]:
    """`anchor_sample` of the images that decode: (the sample, the errors of the unreadable
    ones passed over). Only the sample's candidates are read, so a large set costs n reads.
    `on_corrupt` "error" (data.on_corrupt) raises ImageReadError at the first unreadable one."""
    from sar_ray.data.io import ImageReadError, read_image, read_image_bytes

    picked, bad = [], []
    for r in anchor_sample(records, len(records)):
        if len(picked) == n:
            break
        try:
            read_image_bytes(r.image_bytes, r.name) if r.image_bytes is not None else read_image(r.path)
        except ImageReadError as e:
            if on_corrupt == "error":
                raise ImageReadError(f"{e} (a held-out anchor image; set data.on_corrupt=skip to leave it out)") from None
            bad.append(str(e))
            continue
        picked.append(r)
    return picked, bad


def write_set(records: list[Record], folder: Path) -> Path:
    """A folder `sar-ray evaluate` reads as a set: ``metadata.jsonl`` naming each image by its
    absolute path (images held only as bytes are written out). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(records):
        path = r.path
        if path is None:
            suffix = Path(r.name).suffix if Path(r.name).suffix else ".png"
            path = str((folder / f"{i:06d}{suffix}").resolve())
            Path(path).write_bytes(r.image_bytes or b"")
        row = {"file_name": str(Path(path).resolve()), "text": r.text}
        if r.label is not None:
            row["label"] = r.label
        lines.append(json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return folder


# ------------------------------------------------------------------------------- overlap


def _content_key(r: Record) -> tuple[int, str] | None:
    data = r.image_bytes
    if data is None:
        if r.path is None or not os.path.isfile(r.path):
            return None
        data = Path(r.path).read_bytes()
    return len(data), hashlib.blake2b(data, digest_size=16).hexdigest()


def _size(r: Record) -> int | None:
    if r.image_bytes is not None:
        return len(r.image_bytes)
    try:
        return os.path.getsize(r.path) if r.path else None
    except OSError:
        return None


def overlap(a: list[Record], b: list[Record]) -> list[str]:
    """Names of the images of `a` whose content (bytes) is also in `b`. Only the files of `b`
    whose size matches one of `a`'s are read, so a large `b` costs a listing, not a read."""
    keys = {k for k in map(_content_key, a) if k is not None}
    sizes = {k[0] for k in keys}
    in_b = {k for r in b if _size(r) in sizes for k in [_content_key(r)] if k is not None}
    return [r.name for r in a if _content_key(r) in in_b]


def records_of(path: str | os.PathLike) -> list[Record]:
    """The images of a set folder (a caption table, or just images) as records."""
    from sar_ray.data.dataset import _has_table
    from sar_ray.data.io import IMAGE_EXTENSIONS
    from sar_ray.data.captions import read_table

    root = Path(path).expanduser().absolute()
    if not root.exists():
        raise DataError(f"{root}: image set not found; give a folder of images or a caption table")
    if root.is_file() or _has_table(root):
        return read_table(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return [Record(str(p), None, "", None, str(p.relative_to(root))) for p in files]


def refuse_overlap(what: str, held: list[Record], other: list[Record], other_what: str) -> None:
    shared = overlap(held, other)
    if shared:
        raise SplitError(f"{what} shares {len(shared)} of its {len(held)} images with {other_what} "
                         f"(first: {shared[0]}): the real (held out) anchor must be disjoint from the training "
                         f"and reference images; give a folder of other images")


@dataclass
class StudySplits:
    """Where a sweep's real sets are: the reference folder, the held-out anchor folder (None:
    no anchor row), and how each was chosen (for the report)."""

    reference: str
    holdout: str | None
    n_holdout: int
    note: str


def source_records(data) -> list[Record] | None:
    """The records of `data` (a DataConfig) as training reads them, before the split; None for
    a streamed source (shards, Parquet with image bytes: never listed on the driver)."""
    from sar_ray.data.captions import read_table
    from sar_ray.data.synth import synthetic_path

    if data.path == "synthetic":
        records = read_table(synthetic_path(data.synthetic))
    else:
        from sar_ray.data.streamed import open_source

        if open_source(data) is not None:
            return None
        records = read_table(Path(data.path).expanduser().absolute(), data.captions, data.image_column,
                             data.text_column)
    return records[: data.max_images] if data.max_images is not None else records


def study_splits(data, folder: Path, n_anchor: int, reference: str | None = None,
                 holdout: str | None = None) -> StudySplits:
    """The reference and held-out sets of a sweep, written as set folders under
    ``folder/holdout`` and ``folder/reference`` (a `sar-ray evaluate` input each).

    `data`: the study's DataConfig; `n_anchor`: images in the anchor (a trial's prompts x
    seeds); `reference` / `holdout`: the study's search.reference / search.holdout folders.
    Raises SplitError where a given folder overlaps the training or reference images."""
    records = source_records(data)
    train = val = held = None
    if records is not None:
        train, val, held = split_three(records, data.val_fraction, data.holdout_fraction)
    notes = []
    if reference is not None:
        ref_path = str(Path(reference).expanduser().resolve())
        try:
            ref_records = records_of(ref_path)
        except DataError:
            ref_records = None  # shards: not listed on the driver, not checked
        notes.append(f"reference: {ref_path} (search.reference)")
    elif train is not None:
        ref_records = train
        ref_path = str(write_set(train, folder / REFERENCE_DIR))
        notes.append(f"reference: the {len(train)} training images of data.path")
    else:
        ref_records, ref_path = None, str(Path(data.path).expanduser().resolve()) if "://" not in data.path else data.path
        notes.append(f"reference: {ref_path} (a streamed source: every sample)")

    if holdout is not None:
        given = records_of(holdout)
        what = f"search.holdout {Path(holdout).expanduser().resolve()}"
        checked = []  # what the anchor was shown to be disjoint from
        if train is not None:
            refuse_overlap(what, given, train + (val or []), "the training data (data.path)")
            checked.append("training")
        if ref_records is not None:
            if ref_records is not train:
                refuse_overlap(what, given, ref_records, f"the reference {ref_path}")
            checked.append("reference")
        candidates, source = given, "search.holdout"
    elif held:
        checked = ["training"]  # a split of the same name hash
        if ref_records is not None:
            if ref_records is not train:
                refuse_overlap(f"the held-out split of {data.path} (data.holdout_fraction {data.holdout_fraction})",
                               held, ref_records, f"search.reference {ref_path}")
            checked.append("reference")
        candidates, source = held, f"data.holdout_fraction {data.holdout_fraction} of data.path"
    else:
        why = ("data.path is streamed (shards / Parquet with image bytes)" if records is None
               else "data.holdout_fraction is 0")
        notes.append(f"no real (held out) anchor: {why}; set search.holdout to a folder of real images")
        return StudySplits(ref_path, None, 0, "; ".join(notes))
    anchor, bad = readable_sample(candidates, n_anchor, data.on_corrupt)
    if not anchor:
        raise DataError(f"{source}: none of its {len(candidates)} images is readable (first: {bad[0] if bad else '-'})")
    path = str(write_set(anchor, folder / HOLDOUT_DIR))
    unchecked = [w for w in ("training", "reference") if w not in checked]
    disjoint = (f"disjoint from {' and '.join(checked)}" if checked else "") + (
        f"{'; ' if checked else ''}not checked against {' or '.join(unchecked)} (streamed: not listed on the driver)"
        if unchecked else "")
    left_out = f"; {len(bad)} unreadable left out (first: {bad[0]})" if bad else ""
    if len(anchor) < n_anchor:  # a set distance shrinks with the set: the rows meet different biases
        left_out += (f"; only {len(anchor)} of the {n_anchor} images a trial generates, so its distance is "
                     f"biased upward against the trials' (more held-out images: raise data.holdout_fraction)")
    notes.append(f"real (held out): {len(anchor)} images from {source}, {disjoint}{left_out}")
    return StudySplits(ref_path, path, len(anchor), "; ".join(notes))
