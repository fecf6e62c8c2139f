"""The registry of metric families: each family is one module that owns its whole path.

    fam = FAMILIES["stats"]
    cols = fam.describe(images, cfg)            # per-image columns; runs on Ray Data workers
    agg = fam.aggregate(gen, ref, cfg, ctx)     # set-level metrics; runs on the driver
    fam.directions["stats/js"]                  # "min": lower is better
    fam.columns                                 # the report's (label, metric) columns

A family module (``stats.py``, ``glcm.py``, ``clip.py``) defines ``FAMILY = Family(...)``;
adding a family is one such module plus its name in ``_MODULES``. ``sar_ray.evaluate`` runs
every requested family over two image sets, ``report`` shows their columns, and the
bootstrap (:func:`bootstrap_intervals`) resamples the generated set's images through the same
``aggregate``, so a new family gets its intervals with no extra code.

Metric names are ``<family>/<metric>[/<detail>]``; an interval bound is
``<metric>.ci_lo`` / ``<metric>.ci_hi`` (floats, so MLflow and Tune take them as metrics).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Registration order is the order of metrics in tables and metrics.json.
_MODULES = ("stats", "glcm", "clip")

#: Suffixes of the two bounds of a metric's bootstrap interval.
CI_SUFFIXES = (".ci_lo", ".ci_hi")
#: Coverage of the bootstrap intervals.
CI_LEVEL = 0.95


@dataclass
class SetView:
    """What one family sees of one image set (all images, or one bootstrap resample).

    columns: the family's per-image columns, one row per image in input order (a resample
    repeats rows); sums: its pooled columns (histograms) summed over the images; class_sums:
    the same per class label; text / label: each row's prompt and class.
    """

    n: int
    columns: dict[str, np.ndarray]
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    class_sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    text: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, object))


@dataclass
class Context:
    """Driver-side extras for ``aggregate``: the family's model (``Family.load`` on the CPU, or
    the one the caller passed), whether this call scores a bootstrap resample (skip summaries
    and warnings, use cheaper estimators where the family says so), and a cache that lives
    across the resamples of one evaluation (e.g. prompt embeddings)."""

    model: Any = None
    resample: bool = False
    cache: dict = field(default_factory=dict)


@dataclass
class Aggregate:
    """A family's set-level result: metrics, a summary for metrics.json, warnings, and
    per-image columns for the per-image table (``{"generated": {col: (N,)}, "reference": ...}``)."""

    metrics: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    per_image: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One metric family.

    describe(images, cfg, model=None): (N, H, W) float32 [0, 1] images -> {column: (N, ...)}.
    aggregate(generated, reference, cfg, ctx): two :class:`SetView` -> :class:`Aggregate`.
    directions: ``{metric: "min" | "max"}`` (names with a ``/<detail>`` resolve to their base).
    columns: ``(label, metric)`` columns of the strategy comparison report.
    pooled: describe columns that aggregate needs only as sums (histograms): the driver keeps
      sums (and per-resample sums), never per-image rows, so a large set stays small.
    load(cfg, device): the model describe needs (loaded once per Ray Data actor; on the
      driver for aggregate); None for model-free families (plain CPU tasks).
    """

    name: str
    describe: Callable[..., dict[str, np.ndarray]]
    aggregate: Callable[[SetView, SetView, Any, Context], Aggregate]
    directions: Mapping[str, str]
    columns: Sequence[tuple[str, str]] = ()
    pooled: tuple[str, ...] = ()
    load: Callable[[Any, str], Any] | None = None


def _load_registry() -> dict[str, Family]:
    return {m: importlib.import_module(f"{__name__}.{m}").FAMILY for m in _MODULES}


FAMILIES: dict[str, Family] = _load_registry()

#: "min": lower is better (a distance or gap); "max": higher is better. Every family's metrics.
METRIC_DIRECTION: dict[str, str] = {k: v for f in FAMILIES.values() for k, v in f.directions.items()}


def requested(names: Sequence[str]) -> list[Family]:
    """The families named in `names` (``eval.metrics``), in registry order; unknown -> KeyError."""
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise KeyError(f"unknown metric family {unknown[0]!r}; valid: {', '.join(FAMILIES)}")
    return [f for n, f in FAMILIES.items() if n in names]


def metric_direction(name: str) -> str:
    """"min" or "max" for any metric name, including ``stats/kl/<class>``,
    ``glcm/rel_mean_diff/<property>`` and interval bounds ``stats/js.ci_lo``."""
    for suffix in CI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    family = FAMILIES.get(name.split("/")[0])  # looked up now: a family registered later counts
    directions = family.directions if family is not None else {}
    for key in (name, "/".join(name.split("/")[:2])):
        if key in directions:
            return directions[key]
    raise KeyError(f"unknown metric {name!r}; known: {', '.join(k for f in FAMILIES.values() for k in f.directions)}")


def report_columns() -> list[tuple[str, str]]:
    """Every family's report columns, in registry order."""
    return [c for f in FAMILIES.values() for c in f.columns]


# ------------------------------------------------------------------------------- bootstrap


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int64: how often each of n images is drawn in each resample of n images
    with replacement (multinomial, seeded: the same n and seed give the same draws)."""
    if resamples <= 0 or n <= 0:
        return np.zeros((0, n), np.int64)
    rng = np.random.default_rng([seed, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.int64)


def interval(point: float, values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Bootstrap interval of a metric from its resampled values, centred on the estimate.

    Set distances are biased upward under resampling (a resample repeats images, so even a
    set against itself is no longer at distance 0): the percentile interval of the raw values
    can lie wholly above the estimate. The resampled distribution is therefore shifted so
    that its median sits on the estimate (its spread kept), then cut at 0 when the metric and
    every resampled value are >= 0. Always contains the estimate; nan when fewer than half of
    the resamples gave a finite value (e.g. a class missing from most resamples).
    """
    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    if not np.isfinite(point) or ok.size == 0 or ok.size < 0.5 * v.size:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    q_lo, med, q_hi = np.quantile(ok, [a, 0.5, 1 - a])
    lo, hi = point - (med - q_lo), point + (q_hi - med)
    if point >= 0 and ok.min() >= 0:
        lo = max(lo, 0.0)
    return float(lo), float(hi)


def bootstrap_intervals(
    points: dict[str, float], resample_metrics: Callable[[int], dict[str, float]], resamples: int,
    level: float = CI_LEVEL,
) -> dict[str, tuple[float, float]]:
    """``{metric: (lo, hi)}`` for every metric in `points`; `resample_metrics(b)` scores resample b."""
    draws: dict[str, list[float]] = {k: [] for k in points}
    for b in range(resamples):
        m = resample_metrics(b)
        for k in draws:
            draws[k].append(float(m.get(k, float("nan"))))
    return {k: interval(points[k], np.array(v), level) for k, v in draws.items()}


def flat_intervals(intervals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``{"<metric>.ci_lo": lo, "<metric>.ci_hi": hi}``: intervals as MLflow/Tune metrics."""
    out = {}
    for k, (lo, hi) in intervals.items():
        out[k + CI_SUFFIXES[0]], out[k + CI_SUFFIXES[1]] = lo, hi
    return out


def is_interval_key(name: str) -> bool:
    return name.endswith(CI_SUFFIXES)


__all__ = [
    "CI_LEVEL", "CI_SUFFIXES", "FAMILIES", "METRIC_DIRECTION", "Aggregate", "Context", "Family", "SetView",
    "bootstrap_counts", "bootstrap_intervals", "flat_intervals", "interval", "is_interval_key",
    "metric_direction", "report_columns", "requested",
]
