"""The metric-family registry and the bootstrap intervals every set-level metric gets.

In memory (`score_arrays`, no Ray): synthetic SAR scenes normalised as training sees them.
"""

import numpy as np
import pytest

from sar_ray.config import EvalConfig
from sar_ray.data.normalize import normalize
from sar_ray.data.synth import layout_scene
from sar_ray.evaluate import METRIC_DIRECTION, metric_direction, score_arrays
from sar_ray.metrics.families import FAMILIES, Aggregate, Family, interval, is_interval_key
from sar_ray.report import COLUMNS

SIZE = 32
# Every set-level distance that a strategy comparison ranks by.
DISTANCES = ["stats/kl", "stats/js", "stats/wasserstein", "stats/ks", "stats/enl_gap",
             "glcm/frechet", "glcm/rel_mean_diff", "glcm/wasserstein"]


def scenes(n, seed):
    rng = np.random.default_rng(seed)
    cfg = EvalConfig()
    out = []
    for _ in range(n):
        sigma0 = layout_scene(rng, SIZE).sigma0.astype(np.float64)
        out.append(normalize(np.sqrt(sigma0 * rng.standard_gamma(4, (SIZE, SIZE)) / 4), cfg.normalization))
    return np.stack(out)


@pytest.fixture(scope="module")
def sets():
    return {"reference": scenes(48, 0), "small": scenes(8, 1), "large": scenes(64, 2)}


@pytest.fixture(scope="module")
def scored(sets):
    cfg = EvalConfig(generated_normalized=False, bootstrap=200)
    return {k: score_arrays(sets[k], sets["reference"], cfg) for k in ("small", "large")}


def test_every_metric_has_an_interval_that_contains_it(scored):
    m = scored["large"]
    points = {k: v for k, v in m.items() if not is_interval_key(k)}
    assert set(DISTANCES) <= set(points)
    for k, v in points.items():
        lo, hi = m[f"{k}.ci_lo"], m[f"{k}.ci_hi"]
        assert lo <= v <= hi, (k, lo, v, hi)
    # A distance's interval has width: the data cannot pin it down exactly.
    assert all(m[f"{k}.ci_hi"] > m[f"{k}.ci_lo"] for k in DISTANCES)


def test_intervals_shrink_with_more_images(scored):
    def width(m, k):
        return m[f"{k}.ci_hi"] - m[f"{k}.ci_lo"]

    wider = {k: (width(scored["small"], k), width(scored["large"], k)) for k in DISTANCES}
    # 8 -> 64 images: ~sqrt(8) = 2.8x narrower; ask for clearly narrower, not the exact rate.
    assert all(large < 0.8 * small for small, large in wider.values()), wider


def test_intervals_are_deterministic_given_the_seed(sets, scored):
    cfg = EvalConfig(generated_normalized=False, bootstrap=200)
    again = score_arrays(sets["small"], sets["reference"], cfg)
    assert again == scored["small"]
    other = score_arrays(sets["small"], sets["reference"], cfg.model_copy(update={"seed": 1}))
    assert other["stats/js"] == again["stats/js"]  # point values do not depend on the seed
    assert other["stats/js.ci_hi"] != again["stats/js.ci_hi"]


def test_no_intervals_with_bootstrap_zero(sets):
    m = score_arrays(sets["small"], sets["reference"], EvalConfig(generated_normalized=False, bootstrap=0))
    assert m and not any(is_interval_key(k) for k in m)


def test_interval_is_centred_on_the_estimate_and_kept_non_negative():
    # Resampled distances sit above the estimate (resamples repeat images): the interval is
    # shifted onto the estimate, keeping the spread, and never goes below 0 for a distance.
    values = np.linspace(0.02, 0.06, 101)  # median 0.04
    assert interval(0.03, values) == pytest.approx((0.03 - 0.019, 0.03 + 0.019))
    assert interval(0.0, values)[0] == 0.0
    lo, hi = interval(0.5, np.array([np.nan] * 60 + [0.5] * 40))
    assert np.isnan(lo) and np.isnan(hi)  # most resamples undefined: no interval


def test_registry_gives_directions_and_report_columns():
    assert set(METRIC_DIRECTION) == {k for f in FAMILIES.values() for k in f.directions}
    assert metric_direction("stats/js.ci_lo") == "min" and metric_direction("clip/score.ci_hi") == "max"
    family_columns = [c for f in FAMILIES.values() for c in f.columns]
    assert COLUMNS[: len(family_columns)] == family_columns
    assert all(metric_direction(k) for _, k in family_columns)


def test_a_new_family_is_one_registration(sets, monkeypatch):
    """A family defined in one place is described, aggregated, bootstrapped and directed."""

    def describe(images, cfg, model=None):
        return {"bright": (images > 0.5).mean(axis=(1, 2))}

    def aggregate(gen, ref, cfg, ctx):
        return Aggregate({"bright/gap": float(abs(gen.columns["bright"].mean() - ref.columns["bright"].mean()))})

    monkeypatch.setitem(FAMILIES, "bright", Family("bright", describe, aggregate, {"bright/gap": "min"}))
    cfg = EvalConfig(metrics=["bright"], generated_normalized=False)
    m = score_arrays(sets["small"], sets["reference"], cfg)
    expected = abs((sets["small"] > 0.5).mean() - (sets["reference"] > 0.5).mean())
    assert set(m) == {"bright/gap", "bright/gap.ci_lo", "bright/gap.ci_hi"}
    assert m["bright/gap"] == pytest.approx(expected)
    assert m["bright/gap.ci_lo"] <= m["bright/gap"] <= m["bright/gap.ci_hi"]
    assert metric_direction("bright/gap") == "min"


def test_an_unknown_family_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown metric family 'glcn'.*did you mean 'glcm'.*stats, glcm, clip"):
        EvalConfig(metrics=["stats", "glcn"])
