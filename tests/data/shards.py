"""Tiny WebDataset shards in SARLO-80's layout, written with tarfile: KEY.sar.npy (complex64
SLC), KEY.sar.png (16-bit amplitude), KEY.meta.json (captions SHORT / MID / LONG)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def slc(key: str, shape=(24, 32)) -> np.ndarray:
    """A complex64 scene whose amplitude is known: |s| = 1 + (row + col) % 7."""
    h, w = shape
    amp = 1.0 + (np.add.outer(np.arange(h), np.arange(w)) + int(key)) % 7
    phase = np.random.default_rng(int(key)).uniform(-np.pi, np.pi, shape)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def meta(key: str) -> dict:
    return {"id": key, "caption": {"SHORT": f"scene {key}", "MID": f"a SAR scene number {key}",
                                   "LONG": f"a long description of SAR scene number {key}"}}


def sample(key: str, shape=(24, 32)) -> dict[str, bytes]:
    s = slc(key, shape)
    npy = io.BytesIO()
    np.save(npy, s)
    png = io.BytesIO()
    Image.fromarray(np.round(np.abs(s) * 1000).astype(np.uint16)).save(png, format="PNG")
    return {"sar.npy": npy.getvalue(), "sar.png": png.getvalue(), "meta.json": json.dumps(meta(key)).encode()}


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A tar of `samples` (key -> member -> bytes), members of a sample adjacent, keys sorted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key in sorted(samples):
            for member, data in samples[key].items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def write_sarlo(root: Path, n_shards: int = 3, per_shard: int = 4, shape=(24, 32)) -> list[Path]:
    """`n_shards` shards shard-000000.tar ... of `per_shard` samples with keys 0000, 0001, ..."""
    out = []
    for s in range(n_shards):
        keys = [f"{s * per_shard + i:04d}" for i in range(per_shard)]
        out.append(write_shard(root / f"shard-{s:06d}.tar", {k: sample(k, shape) for k in keys}))
    return out
