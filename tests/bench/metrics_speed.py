"""Speed of the SAR metrics against the scikit-image reference, and Ray Data scaling.

    python tests/bench/metrics_speed.py                  # ~1-2 minutes on 2 cores
    python tests/bench/metrics_speed.py --n 32 --pipeline-n 400

1. Descriptors on the same 256 x 256 synthetic SAR images, in one run: the per-image skimage
   loop (graycomatrix + graycoprops for 7 properties) against ``glcm_props`` at 256 and 64 grey
   levels, 3 distances x 4 angles; the largest difference of values; and the speckle statistics.
   Goal at 256 levels: >= 20x faster, identical values.
2. The whole ``evaluate`` pipeline (decode, normalise, statistics, GLCM) on a folder of PNGs
   with a local Ray of 1 CPU and of 2 CPUs (fresh processes, after a warm-up run), and the
   scaling ratio. Goal: >= 1.7x.

Timings are the best of `--repeats` runs, interleaved, so load from other processes skews
both sides alike. Not a test: pytest does not collect this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from sar_ray.config import EvalConfig, NormalizationConfig  # noqa: E402
from sar_ray.data.normalize import normalize  # noqa: E402
from sar_ray.data.synth import generate_scene  # noqa: E402
from sar_ray.metrics import glcm, statistics  # noqa: E402

DISTANCES, ANGLES = [1, 2, 4], [0.0, 45.0, 90.0, 135.0]


def scenes(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size) synthetic SAR amplitude normalised to [0, 1] as training does."""
    rng = np.random.default_rng(seed)
    cfg = NormalizationConfig()
    return np.stack([normalize(generate_scene(rng, size, 4)[0], cfg) for _ in range(n)])


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function, runs interleaved."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def bench_descriptors(n: int, size: int, repeats: int) -> None:
    images = scenes(n, size)
    print(f"descriptors: {n} images {size}x{size}, distances {DISTANCES}, angles {ANGLES}, best of {repeats}")
    for levels in (256, 64):
        q = glcm.quantize(images, levels)
        ours = glcm.glcm_props(q, levels, DISTANCES, ANGLES)
        ref = glcm.glcm_props_skimage(q, levels, DISTANCES, ANGLES)
        diff = float(np.max(np.abs(ours - ref) / np.maximum(1.0, np.abs(ref))))
        t = best_of(
            {
                "skimage": lambda: glcm.glcm_props_skimage(q, levels, DISTANCES, ANGLES),
                "sar_ray": lambda: glcm.glcm_props(q, levels, DISTANCES, ANGLES),
            },
            repeats,
        )
        print(
            f"  GLCM {levels:3d} levels: skimage loop {1e3 * t['skimage'] / n:7.2f} ms/image, "
            f"sar_ray {1e3 * t['sar_ray'] / n:6.2f} ms/image, ratio {t['skimage'] / t['sar_ray']:5.1f}x, "
            f"max rel. difference {diff:.1e}"
        )

    def stats_all():
        for im in images:
            statistics.sar_descriptors(im)
            statistics.amplitude_histogram(im, 256)
            statistics.amplitude_histogram(im, statistics.CDF_BINS)

    t = best_of({"stats": stats_all}, repeats)
    print(f"  statistics (ENL, CV, log-cumulants, Gamma/K fits, 2 histograms): {1e3 * t['stats'] / n:.2f} ms/image")


def write_pngs(folder: Path, n: int, size: int, seed: int) -> Path:
    from sar_ray.data.io import write_amplitude_png

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(scenes(n, size, seed)):
        write_amplitude_png(folder / f"{i:05d}.png", img)
        rows.append({"file_name": f"{i:05d}.png", "text": "<SAR> image", "seed": i})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def pipeline_child(generated: str, reference: str, cpus: int, repeats: int, levels: int, batch: int) -> None:
    """Runs in a fresh process: one local Ray with `cpus` CPUs; prints the best time as JSON."""
    import ray

    from sar_ray.evaluate import evaluate

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = EvalConfig(glcm_levels=levels, batch_size=batch, per_class=False)
    evaluate(generated, reference, cfg, progress=False)  # warm-up: start workers, import modules
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate(generated, reference, cfg, progress=False)
        times.append(time.perf_counter() - t)
    print(json.dumps({"cpus": cpus, "best": min(times), "times": times}))


def _busy(_: int) -> float:
    x = np.random.default_rng(0).random((256, 256))
    t = time.perf_counter()
    for _ in range(200):
        np.sort(x, axis=None)
    return time.perf_counter() - t


def machine_check() -> float:
    """How many cores two plain processes actually get (2.0 on an idle 2-core machine)."""
    import multiprocessing as mp

    one = min(_busy(0) for _ in range(2))
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_busy, [0, 1])  # start-up
        t = time.perf_counter()
        pool.map(_busy, [0, 1])
        two = time.perf_counter() - t
    return 2 * one / two


def bench_pipeline(n: int, size: int, repeats: int, levels: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gen = write_pngs(Path(tmp) / "generated", n, size, seed=1)
        ref = write_pngs(Path(tmp) / "reference", n, size, seed=2)
        print(f"pipeline: evaluate() on {n} + {n} PNGs {size}x{size} (stats + GLCM {levels} levels), "
              f"batch {batch}, best of {repeats} after a warm-up")
        best = {}
        env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONPATH": str(ROOT)}
        for cpus in (1, 2):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(gen), str(ref), str(cpus), str(repeats),
                 str(levels), str(batch)],
                capture_output=True, text=True, env=env, check=False,
            )
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not line:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"pipeline run with {cpus} CPUs failed")
            best[cpus] = json.loads(line[-1])["best"]
            print(f"  {cpus} CPU{'s' if cpus > 1 else ' '}: {best[cpus]:6.2f} s ({2 * n / best[cpus]:6.1f} images/s)")
        print(f"  scaling 1 -> 2 CPUs: {best[1] / best[2]:.2f}x (two plain processes on this machine: "
              f"{machine_check():.2f}x; the ceiling when other work shares the cores)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        g, r, cpus, repeats, levels, batch = argv[1:7]
        pipeline_child(g, r, int(cpus), int(repeats), int(levels), int(batch))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="images for the descriptor timings")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pipeline-n", type=int, default=256, help="images per set for the pipeline timing")
    p.add_argument("--pipeline-levels", type=int, default=64)
    p.add_argument("--pipeline-batch", type=int, default=16)
    p.add_argument("--skip-pipeline", action="store_true")
    args = p.parse_args(argv)
    print(f"cpus: {os.cpu_count()}, load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bench_descriptors(args.n, args.size, args.repeats)
    if not args.skip_pipeline:
        bench_pipeline(args.pipeline_n, args.size, args.repeats, args.pipeline_levels, args.pipeline_batch)


if __name__ == "__main__":
    main()
