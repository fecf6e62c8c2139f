"""WebDataset shards: tar files whose members ``KEY.MEMBER`` group into samples (SARLO-80:
``KEY.sar.npy`` complex64 SLC, ``KEY.sar.png`` amplitude, ``KEY.meta.json`` with captions).

    spec = Spec.of("sar.npy", "caption.MID")       # data.image_column, data.text_column
    shards, fs = list_shards("/data/sarlo80/shard-{000000..000519}.tar")
    peek(shards[0], fs, spec)                       # driver: the first samples fit the spec, or DataError
    scan_shard(shard, fs, spec)                     # a Ray task: every sample's key and problem, from
                                                    # tar headers, JSON members and .npy headers only
    read_rows(shards, fs, spec)                     # ray.data.read_webdataset -> the rows of a table

A caption is a dotted path into the sample's JSON member (``caption.MID``; with several JSON
members, ``meta.json:caption.MID``) or a text member's name (``txt``). Problems are one line
naming the shard and the sample key. Samples are grouped as Ray's reader groups them (the key is
the member name up to its first dot), so the scan and the read see the same samples.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sar_ray.data.captions import DataError
from sar_ray.data.dataset import image_key
from sar_ray.data.io import ImageReadError, npy_header
from sar_ray.data.storage import display, list_files

SHARD_EXTENSIONS = (".tar",)
PEEK_SAMPLES = 8  # the driver's up-front check: a config that fits none of these is wrong
HEADER_BYTES = 4096  # enough for any .npy header
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # Ray's webdataset key/suffix split


class SampleError(ValueError):
    """One sample that does not fit the spec; the message names what is missing."""


@dataclass(frozen=True)
class Spec:
    """Which member is the image and where each candidate caption is."""

    image: str  # member suffix, e.g. "sar.npy"
    texts: tuple[str, ...]  # dotted JSON paths ("caption.MID", "meta.json:caption.MID") or members ("txt")

    @classmethod
    def of(cls, image_column: str, text_column: str | list[str]) -> Spec:
        from sar_ray.config import text_columns

        return cls(image_column, text_columns(text_column))

    def text_members(self, members: list[str]) -> list[str]:
        """The members (of a sample with `members`) that captions are read from."""
        out = []
        for t in self.texts:
            member, _ = _split_text(t, members)
            if member is not None and member not in out:
                out.append(member)
        return out


def is_webdataset(path: str) -> bool:
    """`data.path` names tar shards: a `.tar`, a pattern of them, or a folder holding them."""
    p = str(path).split("?", 1)[0].rstrip("/")
    if p.lower().endswith(SHARD_EXTENSIONS):
        return True
    if "://" in p:
        return False  # a prefix: decided by what it lists (see dataset.build_datasets)
    local = os.path.expanduser(p)
    return os.path.isdir(local) and not _has_caption_table(local) and any(
        n.lower().endswith(SHARD_EXTENSIONS) for n in os.listdir(local)
    )


def list_shards(path: str) -> tuple[list[str], object]:
    """Sorted shard paths and their pyarrow filesystem; DataError when there are none."""
    shards, fs = list_files(path, SHARD_EXTENSIONS)
    if not shards:
        raise DataError(f"{path}: no WebDataset shards (.tar files) here; point data.path at them")
    return shards, fs


# ------------------------------------------------------------------------------ samples


def iter_samples(fileobj, shard: str, heads: bool = False, full=None) -> Iterator[tuple[str, dict]]:
    """(key, {member: bytes}) of each sample in tar order (a stream is enough).

    heads=True (a seekable file): members for which ``full(member)`` is true give their
    bytes (JSON, text), the others only their first HEADER_BYTES (an .npy header, a PNG's
    IHDR), so a scan reads headers, not pixels. ``sample["__info__"]`` maps each member to its
    TarInfo (size, offset of its data).
    """
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:" if heads else "r|*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{shard}: not a readable tar file ({e})") from None
    key, sample = None, {}
    try:
        for info in tf:
            if not info.isreg():
                continue
            m = _KEY.match(info.name)
            if m is None:
                continue
            prefix, suffix = m.group(1), m.group(2)
            if prefix != key:
                if key is not None:
                    yield key, sample
                key, sample = prefix, {"__info__": {}}
            f = tf.extractfile(info)
            sample[suffix] = f.read(HEADER_BYTES) if heads and not (full and full(suffix)) else f.read()
            sample["__info__"][suffix] = info
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{shard}: truncated or corrupt tar after sample {key} ({e})") from None
    if key is not None:
        yield key, sample


def _split_text(text: str, members: list[str]) -> tuple[str | None, str | None]:
    """(member, JSON path or None) a caption spec reads, or (None, None) when no member fits."""
    if text in members:
        return text, None  # a text member (e.g. "txt")
    if ":" in text:
        member, path = text.split(":", 1)
        return (member if member in members else None), path
    jsons = [m for m in members if m.endswith("json")]
    return (jsons[0] if len(jsons) == 1 else None), text


def resolve_text(text: str, sample: dict, where: str) -> str:
    """The caption `text` names in `sample` (member -> bytes); SampleError saying why not."""
    members = sorted(k for k in sample if not k.startswith("__"))
    member, path = _split_text(text, members)
    if member is None:
        jsons = [m for m in members if m.endswith("json")]
        why = (f"several JSON members ({', '.join(jsons)}); write data.text_column as "
               f"'{jsons[0]}:{text}'" if len(jsons) > 1 else
               f"no JSON member or member {text!r} (members: {', '.join(members) or 'none'})")
        raise SampleError(f"{where}: caption {text!r}: {why}")
    raw = sample[member]
    if not isinstance(raw, (bytes, bytearray)):
        raise SampleError(f"{where}: member {member!r} was not read")
    if path is None:
        return bytes(raw).decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"{where}: {member} is not valid JSON ({e})") from None
    node = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            found = ", ".join(json_paths(doc)[:12]) or "none"
            raise SampleError(f"{where}: {member} has no {path!r} (paths found: {found}); fix data.text_column")
        node = node[part]
    if not isinstance(node, str):
        raise SampleError(f"{where}: {member} {path!r} is a {type(node).__name__}, not a caption string")
    return node


def json_paths(doc, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a JSON document, in document order."""
    if not isinstance(doc, dict) or not doc:
        return [prefix] if prefix else []
    out = []
    for k, v in doc.items():
        out += json_paths(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def check_image_member(spec: Spec, sample: dict, where: str) -> None:
    """SampleError unless the sample has the image member (and, for .npy, a usable header)."""
    members = sorted(k for k in sample if not k.startswith("__"))
    if spec.image not in sample:
        raise SampleError(
            f"{where}: no member {spec.image!r} (members: {', '.join(members) or 'none'}); set "
            "data.image_column to one of them"
        )
    head = sample[spec.image]
    if isinstance(head, (bytes, bytearray)) and spec.image.endswith("npy"):
        try:
            npy_header(bytes(head[:HEADER_BYTES]))
        except ImageReadError as e:
            raise SampleError(f"{where}: {spec.image}: {e}") from None


def check_sample(spec: Spec, sample: dict, where: str) -> None:
    check_image_member(spec, sample, where)
    for t in spec.texts:
        resolve_text(t, sample, where)


def sample_name(shard: str, fs, key: str) -> str:
    """How messages and the rows' `path` column name a sample: ``shard.tar:KEY``."""
    return f"{display(shard, fs)}:{key}"


def peek(shard: str, fs, spec: Spec) -> list[str]:
    """Check the first samples of `shard` on the driver; the JSON/text members the captions need.

    A spec that fits none of the first PEEK_SAMPLES samples is a config error (a wrong member
    name, JSON path or dtype), raised at once as DataError naming the shard and key, before a
    scan over every shard; problems of single samples are the scan's (and data.on_corrupt's).
    """
    first_error = None
    with _open(shard, fs, stream=True) as f:
        for i, (key, sample) in enumerate(iter_samples(f, display(shard, fs))):
            where = f"{display(shard, fs)}: sample {key}"
            try:
                check_sample(spec, sample, where)
                return spec.text_members(sorted(k for k in sample if not k.startswith("__")))
            except SampleError as e:
                first_error = first_error or str(e)
            if i + 1 >= PEEK_SAMPLES:
                break
    if first_error is None:
        raise DataError(f"{display(shard, fs)}: shard holds no samples (no KEY.member files)")
    raise DataError(first_error)


def scan_shard(shard: str, fs, spec: Spec, wanted: tuple[str, ...]) -> list[dict]:
    """One row per sample of `shard`: ``key``, ``error`` ("" when usable), read from headers."""
    rows = []
    where_shard = display(shard, fs)
    with _open(shard, fs, stream=False) as f:
        for key, sample in iter_samples(f, where_shard, heads=True, full=wanted.__contains__):
            try:
                check_sample(spec, sample, f"{where_shard}: sample {key}")
                err = ""
            except SampleError as e:
                err = str(e)
            rows.append({"key": key, "error": err})
    return rows


class _open:
    """A pyarrow file of `shard` as a Python file object (a stream, or seekable)."""

    def __init__(self, shard: str, fs, stream: bool):
        self.shard, self.fs, self.stream = shard, fs, stream

    def __enter__(self):
        try:
            self.f = self.fs.open_input_stream(self.shard) if self.stream else self.fs.open_input_file(self.shard)
        except Exception as e:  # noqa: BLE001 - OSError (S3, permissions), FileNotFoundError
            raise DataError(f"{display(self.shard, self.fs)}: cannot open ({' '.join(str(e).split())[:300]})") from None
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def pick_text(texts: list[str], key_hash: int) -> str:
    """One caption of several, chosen by the sample's hash: the same every run. The fixed one
    (validation, reference prompts); training samples one per epoch (`dataset.epoch_caption`)."""
    return texts[key_hash % len(texts)]


def read_rows(shards: list[str], fs, spec: Spec, text_members: list[str]):
    """`ray.data.read_webdataset` of `shards` (raw member bytes, nothing decoded by Ray)."""
    import ray.data

    return ray.data.read_webdataset(
        shards, filesystem=fs, decoder=None, suffixes=[spec.image, *text_members],
    )


def member_path(shard: str, fs, member: str, info: tarfile.TarInfo) -> str:
    """A path `io.read_image` reads one member of a shard from (see there)."""
    return f"{display(shard, fs)}!{member}@{info.offset_data}+{info.size}"


def list_samples(path: str, image_column: str | None = None, text_column: str | list[str] | None = None,
                 max_images: int | None = None, on_corrupt: str | None = None) -> list:
    """Records of a WebDataset's samples (the first `max_images` in shard order) whose `path`
    is a member path, so nothing but names travels.

    `on_corrupt` None (``sar-ray evaluate --reference``): `image_column` None means the first
    ``.npy`` member, else ``.png``/``.tif``; `text_column` None: no captions. Samples without
    the image member are left out, a JSON path that does not resolve is a DataError (the caption
    spec is wrong); records are named ``shard.tar:KEY``.

    `on_corrupt` "skip" or "error" (training readers: ``sar-ray clip train``): samples are
    checked as diffusion training checks them. A spec that fits none of the first samples is
    `peek`'s DataError; a sample that does not fit it (`check_sample`: member, caption path,
    .npy header) is left out ("skip") or refused with the first problem and the count
    ("error"), the message `dataset.build_datasets` gives. `max_images` counts samples scanned,
    as training's scan does. Records are named by their sample key (what training's split and
    caption choices hash) and, with several caption columns, carry every candidate (`texts`)."""
    from sar_ray.config import text_columns
    from sar_ray.data.captions import Record

    shards, fs = list_shards(path)
    texts = () if text_column is None else text_columns(text_column)
    training = on_corrupt is not None
    if training:
        if image_column is None:
            raise ValueError("list_samples: on_corrupt needs an image_column")
        spec = Spec(image_column, texts)
        wanted = set(peek(shards[0], fs, spec))  # DataError when the config fits no sample
    else:
        wanted = set()
    records, n, bad, first_error = [], 0, 0, ""
    samples = _samples(shards, fs, lambda m: m in wanted or m.endswith(("json", "txt")))
    for shard, key, sample in samples:
        infos = sample["__info__"]
        where = f"{display(shard, fs)}: sample {key}"
        if training:
            n += 1
            try:
                check_sample(spec, sample, where)
            except SampleError as e:
                bad, first_error = bad + 1, first_error or str(e)
                if max_images is not None and n >= max_images:
                    break
                continue
            member = image_column
        else:
            member = image_column or _first_image_member(infos)
            if member not in infos:
                continue
        try:
            caption = [resolve_text(t, sample, where) for t in texts]
        except SampleError as e:
            raise DataError(str(e)) from None
        text = pick_text(caption, image_key(f"{key}")) if caption else ""
        records.append(Record(member_path(shard, fs, f"{key}.{member}", infos[member]), None, text, None,
                              key if training else sample_name(shard, fs, key),
                              tuple(caption) if training and len(caption) > 1 else ()))
        if max_images is not None and (n if training else len(records)) >= max_images:
            break
    samples.close()  # the open shard of an early stop
    if training and bad:
        if on_corrupt == "error":
            raise ImageReadError(f"{first_error} ({bad} of {n} images in {path} unusable; set "
                                 "data.on_corrupt=skip to leave them out)")
        if not records:
            raise DataError(f"{path}: no usable images (all {n} unusable, first: {first_error})")
        import logging

        logging.getLogger(__name__).warning("skipped %d of %d samples of %s: %s", bad, n, path, first_error)
    if not records:
        raise DataError(f"{path}: empty dataset (no sample has an image member"
                        f"{f' {image_column!r}' if image_column else ''})")
    return records


def _samples(shards: list[str], fs, full) -> Iterator[tuple[str, str, dict]]:
    """(shard, key, sample) of every sample of `shards` in order, from headers (see `iter_samples`)."""
    for shard in shards:
        with _open(shard, fs, stream=False) as f:
            for key, sample in iter_samples(f, display(shard, fs), heads=True, full=full):
                yield shard, key, sample


def is_shards(data: str | os.PathLike) -> bool:
    """`data` names WebDataset shards (a .tar, a folder of them, a brace pattern, s3://)."""
    return str(data) != "synthetic" and (is_webdataset(str(data)) or "://" in str(data))


def list_streamed(path, max_images: int | None = None, columns: tuple | None = None) -> list | None:
    """`list_samples` of `path` when it names WebDataset shards (local, a pattern or s3://),
    None for a folder or caption table. `columns`: (image_column, text_column) or None."""
    if not is_shards(path):
        return None
    return list_samples(str(path), *(columns or (None, None)), max_images=max_images)


def _first_image_member(members) -> str | None:
    for ext in ("npy", "png", "tif", "tiff", "jpg", "jpeg"):
        found = sorted(m for m in members if m.split(".")[-1].lower() == ext)
        if found:
            return found[0]
    return None


def _has_caption_table(folder: str) -> bool:
    from sar_ray.data.captions import TABLE_EXTENSIONS

    return any(n == "metadata.jsonl" or n.lower().endswith(TABLE_EXTENSIONS) for n in os.listdir(folder))


def decode_member(spec: Spec, sample: dict, where: str) -> np.ndarray:
    """The image member of `sample` as (H, W) float32 linear values (complex -> |s|)."""
    from sar_ray.data.io import read_image_bytes

    data = sample.get(spec.image)
    if data is None:
        raise ImageReadError(f"{where}: no member {spec.image!r}")
    return read_image_bytes(data, f"{where}.{spec.image}")


__all__ = [
    "PEEK_SAMPLES", "SHARD_EXTENSIONS", "SampleError", "Spec", "check_sample", "decode_member",
    "is_webdataset", "iter_samples", "json_paths", "list_samples", "list_shards", "list_streamed", "member_path", "peek", "pick_text",
    "read_rows", "resolve_text", "sample_name", "scan_shard",
]
