"""GLCM texture: per-image descriptors (property x distance, averaged over angles) and
set distances of their distributions (relative mean difference, Wasserstein, Frechet)."""

from __future__ import annotations

import numpy as np

from sar_ray.metrics import glcm as glcm_metrics
from sar_ray.metrics.families import Aggregate, Context, Family, SetView


def describe(images: np.ndarray, cfg, model=None) -> dict[str, np.ndarray]:
    return {"features": glcm_metrics.glcm_descriptors(
        images, cfg.glcm_levels, cfg.glcm_distances, cfg.glcm_angles, cfg.glcm_symmetric
    )}  # (N, properties x distances)


def aggregate(gen: SetView, ref: SetView, cfg, ctx: Context) -> Aggregate:
    names = glcm_metrics.descriptor_names(cfg.glcm_distances)
    g, r = gen.columns["features"], ref.columns["features"]
    agg = Aggregate({f"glcm/{k}": v for k, v in glcm_metrics.set_distances(r, g, names).items()})
    if ctx.resample:
        return agg
    if min(len(g), len(r)) < 2:
        agg.warnings.append("glcm/frechet needs >= 2 images per set: nan")
    agg.summary["glcm"] = {"generated": dict(zip(names, _colmeans(g))), "reference": dict(zip(names, _colmeans(r)))}
    agg.per_image = {s: {f"glcm_{n}": x[:, j] for j, n in enumerate(names)} for s, x in (("generated", g), ("reference", r))}
    return agg


def _colmeans(x: np.ndarray) -> list[float]:
    return [float(v) for v in x.mean(axis=0)] if len(x) else []


FAMILY = Family(
    name="glcm",
    describe=describe,
    aggregate=aggregate,
    directions={
        "glcm/rel_mean_diff": "min",  # mean over descriptors of |mu_g - mu_r| / mean(|mu_g|, |mu_r|)
        "glcm/wasserstein": "min",  # mean over descriptors of W1 / reference std
        "glcm/frechet": "min",  # Frechet distance of descriptor vectors, z-scored by the reference
    },
    columns=[("GLCM Frechet", "glcm/frechet"), ("GLCM rel. diff", "glcm/rel_mean_diff")],
)
