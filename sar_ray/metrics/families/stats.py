"""Amplitude statistics: pooled-histogram distances and speckle-descriptor gaps.

describe: per image, the amplitude histogram (``hist_bins`` bins, for KL/JS), the fine one
(``CDF_BINS``, for Wasserstein/KS) and the speckle descriptors (ENL, CV, log-cumulants, ...).
aggregate: distances of the two sets' pooled histograms (and per class when labels match),
gaps of the descriptor means.
"""

from __future__ import annotations

import numpy as np

from sar_ray.metrics import statistics as stats
from sar_ray.metrics.families import Aggregate, Context, Family, SetView


def describe(images: np.ndarray, cfg, model=None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {
        "hist": np.stack([stats.amplitude_histogram(im, cfg.hist_bins) for im in images]),
        "hist_fine": np.stack([stats.amplitude_histogram(im, stats.CDF_BINS) for im in images]).astype(np.int32),
    }
    rows = [stats.sar_descriptors(im, cfg.enl_window, cfg.enl_fraction) for im in images]
    for d in stats.DESCRIPTORS:
        out[d] = np.array([r[d] for r in rows], np.float64)
    return out


def _distances(ref: dict, gen: dict, cfg) -> dict[str, float]:
    return stats.histogram_distances(ref["hist"], gen["hist"], ref["hist_fine"], gen["hist_fine"], cfg.hist_smoothing)


def aggregate(gen: SetView, ref: SetView, cfg, ctx: Context) -> Aggregate:
    metrics = {f"stats/{k}": v for k, v in _distances(ref.sums, gen.sums, cfg).items()}
    g_desc = {d: gen.columns[d] for d in stats.DESCRIPTORS}
    r_desc = {d: ref.columns[d] for d in stats.DESCRIPTORS}
    metrics.update({f"stats/{k}": v for k, v in stats.descriptor_gaps(r_desc, g_desc).items()})
    agg = Aggregate(metrics)
    if cfg.per_class:
        # A class none of whose images a resample drew has an empty histogram: no value there.
        common = sorted(lab for lab in set(gen.class_sums) & set(ref.class_sums) if gen.class_sums[lab]["hist"].sum() > 0)
        for lab in common:
            for k, v in _distances(ref.class_sums[lab], gen.class_sums[lab], cfg).items():
                metrics[f"stats/{k}/{lab}"] = v
        agg.summary["classes"] = common
        if not common and gen.n:
            agg.warnings.append(
                "no per-class statistics: generated images have no labels matching the reference "
                "(give metadata.jsonl a 'label' column, or prompts equal to reference captions)"
            )
    if not ctx.resample:
        agg.summary["stats"] = {
            s: {d: _nanmean(desc[d]) for d in stats.DESCRIPTORS} for s, desc in (("generated", g_desc), ("reference", r_desc))
        }
        agg.per_image = {"generated": g_desc, "reference": r_desc}
    return agg


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


FAMILY = Family(
    name="stats",
    describe=describe,
    aggregate=aggregate,
    pooled=("hist", "hist_fine"),
    directions={
        # amplitude distribution of the pooled pixels (normalised [0, 1] amplitude)
        "stats/kl": "min",  # KL(reference || generated), nats, hist_bins bins + pseudo-count
        "stats/js": "min",  # Jensen-Shannon divergence, bits, in [0, 1]
        "stats/wasserstein": "min",  # 1-D earth mover's distance on [0, 1]
        "stats/ks": "min",  # Kolmogorov-Smirnov statistic, in [0, 1]
        # speckle descriptors: gap of the set means (relative to the reference for scale-like
        # descriptors, absolute for the log-cumulants)
        **{f"stats/{d}_gap": "min" for d in stats.DESCRIPTORS},
    },
    columns=[("stat. JS", "stats/js"), ("stat. Wasserstein", "stats/wasserstein")],
)
