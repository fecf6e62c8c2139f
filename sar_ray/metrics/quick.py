"""Quick realism metrics for early stopping: amplitude-histogram distances between a trial's
validation samples and its validation images, computed inside the training loop at every
`train.sample_every` step and reported as `quick/<metric>` (e.g. `quick/stats/js`), so ASHA
can rank trials on realism instead of the validation loss.

They are the `stats/*` set distances of `sar-ray evaluate` on a few images at the sampling
resolution, against the validation split (not the reference set): a rung signal, never the
final objective, which is always the full evaluation of a finished trial.
"""

from __future__ import annotations

import numpy as np

from .statistics import CDF_BINS, amplitude_histogram, histogram_distances

PREFIX = "quick/"
#: What a quick metric may be: the amplitude distances of the `stats` family.
QUICK = ("stats/js", "stats/kl", "stats/wasserstein", "stats/ks")
HIST_BINS = 64


def is_quick(metric: str) -> bool:
    return metric.startswith(PREFIX)


def check_quick(metric: str) -> str:
    """The evaluation metric behind `quick/<metric>`; ValueError naming the valid ones."""
    name = metric[len(PREFIX):]
    if name not in QUICK:
        raise ValueError(f"{metric!r} is not a quick metric; valid: {', '.join(PREFIX + q for q in QUICK)}")
    return name


def quick_metrics(generated01: np.ndarray, reference01: np.ndarray, names=QUICK) -> dict[str, float]:
    """`{"quick/stats/js": ..., ...}` for images in [0, 1] ((N, H, W) each; sizes may differ:
    only the pooled amplitude histograms are compared)."""
    g, r = np.asarray(generated01, dtype=np.float64), np.asarray(reference01, dtype=np.float64)
    if g.size == 0 or r.size == 0:
        raise ValueError("quick metrics need at least one generated and one reference image")
    d = histogram_distances(amplitude_histogram(r, HIST_BINS), amplitude_histogram(g, HIST_BINS),
                            amplitude_histogram(r, CDF_BINS), amplitude_histogram(g, CDF_BINS))
    return {PREFIX + n: float(d[n.split("/", 1)[1]]) for n in names}
