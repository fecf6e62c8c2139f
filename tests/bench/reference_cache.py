# python tests/bench/reference_cache.py N_IMAGES SIZE   (e.g. 64 256)
"""What the reference cache saves per trial, without Ray: describing the reference (decode,
normalise, stats + GLCM, as a Ray Data task does) vs loading its cache entry."""
import sys, tempfile, time
from pathlib import Path

import numpy as np

from sar_ray.config import EvalConfig
from sar_ray.data.synth import write_synthetic
from sar_ray.evaluate import _ReferenceCache, _SetAccumulator, _describe_batch, list_images, requested

n, size = int(sys.argv[1]), int(sys.argv[2])
root = Path(tempfile.mkdtemp())
ref = write_synthetic(root / "ref", n=n, size=size, seed=0)
cfg = EvalConfig(cache_dir=str(root / "cache"))
items, _ = list_images(ref, "reference")
rows = [it.row() for it in items]
batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
fams = requested(cfg.metrics)
t = time.perf_counter()
out = _describe_batch(batch, cfg, (size, size), {"reference": cfg.normalization}, keep_images=False)
acc = _SetAccumulator(fams); acc.add(out, np.ones(n, bool))
t_describe = time.perf_counter() - t
cache = _ReferenceCache.for_reference(cfg, items, (size, size)); w = []
cache.save(acc, w)
t = time.perf_counter()
cache = _ReferenceCache.for_reference(cfg, items, (size, size))  # key: listing stats + code hash
hit = cache.load(fams, n, w)
t_hit = time.perf_counter() - t
print(f"{n} reference images {size}px: describe {t_describe:.2f} s (CPU, one process), cache key + load {t_hit:.3f} s, "
      f"hit={hit is not None}, entry {cache.path.stat().st_size / 1e6:.1f} MB, warnings={w}")
