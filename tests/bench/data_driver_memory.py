"""Driver memory of `build_datasets` on a Parquet table that holds the image bytes: the old path
(`read_table`: the whole table as Python rows on the driver, then `ray.data.from_items`) vs the
streamed one (`ray.data.read_parquet`; the driver reads the footer and gets one count row per read task).

    python tests/bench/data_driver_memory.py                  # 1k and 20k rows, 48 px 16-bit PNGs
    python tests/bench/data_driver_memory.py --rows 1000 5000 --size 32

Each (path, rows) runs in its own process, warmed up on a 64-row table first (imports, Ray's
worker processes), then measures the driver's peak RSS above its RSS just before the call
(Linux VmHWM, reset through /proc/self/clear_refs) and tracemalloc's peak of Python
allocations over the same span. `data.materialize=never`, as a study that streams: what stays on
the driver is what the path keeps there, not the prepared images in Ray's object store. Prints
each figure and the ratios (20k / 1k per path: flat is ~1; old / new per size). Not collected
by pytest; absolute numbers on a shared machine are noise, the ratios are the result.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_table(path: Path, rows: int, size: int) -> int:
    """`rows` distinct random 16-bit PNGs with captions; returns the bytes of image data."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images, total = [], 0
    for _ in range(rows):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(b, format="PNG", compress_level=0)
        images.append(b.getvalue())
        total += len(images[-1])
    table = pa.table({"image": images, "text": [f"<SAR> scene {i}" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=1024)
    return total


def child(which: str, table: str) -> None:
    import tracemalloc

    import ray

    from sar_ray.config import DataConfig
    from sar_ray.data import build_datasets, streamed

    for attempt in range(3):  # a busy shared machine can miss Ray's start-up deadline
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            break
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            if attempt == 2:
                raise
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if which == "old":
        streamed.open_source = lambda cfg: None  # the caption-table path: read_table + from_items
    cfg = DataConfig(path=table, image_column="image", text_column="text", resolution=32,
                     val_fraction=0.01, materialize="never")
    # Warm up on a small table of the same layout: imports, Ray Data's first tasks and worker
    # processes are fixed costs, not what the path keeps per row.
    warm = Path(table).with_name(f"warm-{which}.parquet")
    write_table(warm, 64, 16)
    build_datasets(cfg.model_copy(update={"path": str(warm)}), seed=0)
    _reset_peak()
    base = _status("VmRSS")
    tracemalloc.start()
    t = time.perf_counter()
    data = build_datasets(cfg, seed=0)
    seconds = time.perf_counter() - t
    _, py_peak = tracemalloc.get_traced_memory()
    print(json.dumps({"rss_peak_mb": _status("VmHWM") - base, "py_peak_mb": py_peak / 2**20, "seconds": seconds,
                      "n": data.n_train + data.n_val}))
    ray.shutdown()


def _reset_peak() -> None:
    # Linux: writing 5 resets this process's peak RSS (VmHWM) to its current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> float:
    """A /proc/self/status memory field in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def run(which: str, table: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, str(table)], capture_output=True, text=True,
                         env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{which} {table} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--size", type=int, default=48, help="image side in pixels (16-bit PNG)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            table = Path(tmp) / f"t{n}.parquet"
            mb = write_table(table, n, args.size) / 2**20
            print(f"{n} rows, {mb:.1f} MiB of image bytes ({table.stat().st_size / 2**20:.1f} MiB file)", flush=True)
            for which in ("old", "new"):
                r = results[which, n] = run(which, table)
                print(f"  {which}: driver peak RSS +{r['rss_peak_mb']:.1f} MiB, Python peak {r['py_peak_mb']:.1f} MiB, "
                      f"{r['seconds']:.1f} s, {r['n']} images", flush=True)
    lo, hi = min(args.rows), max(args.rows)
    print(f"\n{'':28}{'old':>10}{'new':>10}")
    for key, label in (("rss_peak_mb", "peak RSS"), ("py_peak_mb", "Python peak")):
        growth = [results[w, hi][key] / max(results[w, lo][key], 1e-3) for w in ("old", "new")]
        print(f"{label + f' {hi} / {lo} rows':28}{growth[0]:>10.2f}{growth[1]:>10.2f}")
        for n in args.rows:
            print(f"{label + f' old / new at {n}':28}{results['old', n][key] / max(results['new', n][key], 1e-3):>10.2f}")
    print(f"{'seconds old / new at ' + str(hi):28}{results['old', hi]['seconds'] / results['new', hi]['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
