"""Where streamed data lives: local files, folders, brace patterns and object storage.

    files, fs = list_files("/data/sarlo80/shard-{000000..000519}.tar", (".tar",))
    files, fs = list_files("s3://bucket/sarlo80/", (".tar",))    # pyarrow's S3 filesystem

`files` are paths on `fs` (a pyarrow filesystem) in sorted order, so every run and every
worker sees the same list. Listing object storage is the first thing a run does, so an
unreachable bucket or endpoint fails here with one line (a :class:`DataError`), before Ray or
any model starts. Endpoints and credentials come from the usual AWS variables or the URI's
query (``s3://bucket/x?endpoint_override=host:9000&scheme=http``).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from sar_ray.data.captions import DataError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def is_remote(path: str) -> bool:
    """A URI with a scheme (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(path)


def has_pattern(path: str) -> bool:
    """A brace pattern (``{000000..000519}``, ``{a,b}``) or a glob (``*``, ``?``)."""
    return bool(_BRACE.search(path)) or any(c in path for c in "*?")


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``a{00..02}`` -> a00, a01, a02 (zero
    padding kept, as WebDataset writes shard names); ``{x,y}`` -> each; several braces multiply."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"{pattern}: brace range {{{body}}} runs backwards; write {{{r.group(2)}..{r.group(1)}}}")
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [name for opt in options for name in expand_braces(head + opt + tail)]


def filesystem(path: str):
    """(pyarrow filesystem, path on it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except Exception as e:  # noqa: BLE001 - ArrowInvalid for an unknown scheme, OSError for S3 setup
        raise DataError(f"{path}: not a storage address pyarrow can open ({_short(e)})") from None


def list_files(path: str, extensions: tuple[str, ...]) -> tuple[list[str], object]:
    """The files with one of `extensions` that `path` names (see module docstring)."""
    import pyarrow.fs as pafs

    path = str(path)
    if is_remote(path) and has_pattern(path.split("?", 1)[0]):
        fs, _ = filesystem(path)
        names = [filesystem(p)[1] for p in expand_braces(path)]
        return _existing(names, fs, path), fs
    if not is_remote(path) and has_pattern(path):
        names = []
        for p in expand_braces(os.path.expanduser(path)):
            names += sorted(glob.glob(p)) if any(c in p for c in "*?") else [p]
        fs = pafs.LocalFileSystem()
        return _existing([os.path.abspath(n) for n in names], fs, path), fs
    fs, root = filesystem(path)
    info = _info(fs, root, path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: not found; give a file, a folder, a brace pattern or an s3:// prefix")
    if info.type == pafs.FileType.File:
        return [root], fs
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except Exception as e:  # noqa: BLE001 - OSError from S3 (network, credentials), permissions
        raise DataError(f"{path}: cannot list ({_short(e)}); check the address, the endpoint and credentials") from None
    files = sorted(
        e.path for e in entries
        if e.type == pafs.FileType.File and e.path.lower().endswith(extensions)
        and not os.path.basename(e.path).startswith(".")
    )
    return files, fs


def display(path: str, fs) -> str:
    """`path` as a user wrote it: local as is, remote with its scheme."""
    name = type(fs).__name__
    if name == "S3FileSystem":
        return f"s3://{path}"
    if name == "GcsFileSystem":
        return f"gs://{path}"
    return path


def _existing(names: list[str], fs, pattern: str) -> list[str]:
    import pyarrow.fs as pafs

    if not names:
        raise DataError(f"{pattern}: the pattern matches no files")
    try:
        infos = fs.get_file_info(names)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{pattern}: cannot read ({_short(e)}); check the address, the endpoint and credentials") from None
    missing = [i.path for i in infos if i.type != pafs.FileType.File]
    if missing:
        raise DataError(
            f"{pattern}: {len(missing)} of {len(names)} files it names do not exist (first: "
            f"{display(missing[0], fs)}); fix the pattern's range"
        )
    return names


def _info(fs, root: str, path: str):
    try:
        return fs.get_file_info(root)
    except Exception as e:  # noqa: BLE001 - OSError from S3 (network, credentials)
        raise DataError(f"{path}: cannot reach ({_short(e)}); check the address, the endpoint and credentials") from None


def _short(e: BaseException) -> str:
    """The first line of an exception, without AWS SDK's detail lines."""
    return " ".join(str(e).split())[:300] or type(e).__name__


def local_path(path: str) -> Path | None:
    """`path` as a local Path, or None for remote data."""
    return None if is_remote(path) else Path(path).expanduser().absolute()
