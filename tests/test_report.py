"""The strategy comparison report: intervals beside the values, and which strategies the data
cannot tell apart from the best."""

import csv
import json
from types import SimpleNamespace

import pytest

from sar_ray.config import ObjectiveConfig
from sar_ray.report import NOT_SEPARABLE, WORSE, build_report


def run(run_id, unet, js, lo, hi):
    params = {"strategy.unet.mode": unet, "strategy.text_encoder.mode": "frozen", "strategy.vae.mode": "frozen"}
    metrics = {"stats/js": js, "stats/js.ci_lo": lo, "stats/js.ci_hi": hi, "val/loss": 0.1}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=f"trial-{run_id}", status="FINISHED"),
                           data=SimpleNamespace(params=params, metrics=metrics))


class FakeTracker:
    """What build_report reads from MLflow: the sweep's child runs; artifacts are collected."""

    experiment, experiment_id = "exp", "0"

    def __init__(self, runs):
        self.logged = []
        self.client = SimpleNamespace(search_runs=lambda *a, **k: runs, download_artifacts=self._no_artifacts)

    @staticmethod
    def _no_artifacts(*args):
        raise FileNotFoundError("no samples in this test")

    def log_artifact(self, run_id, path, folder):
        self.logged.append(path.name)


def test_report_shows_intervals_and_marks_strategies_not_separable_from_the_best(tmp_path):
    runs = [
        run("a", "full", 0.010, 0.006, 0.015),   # best
        run("b", "lora", 0.013, 0.009, 0.020),   # overlaps a's interval
        run("c", "frozen", 0.050, 0.040, 0.060),  # clear of it
    ]
    tracker = FakeTracker(runs)
    out = build_report(tracker, "parent", tmp_path, objective=ObjectiveConfig(metric="stats/js", mode="min"))
    md = (out / "report.md").read_text()
    assert "0.01 [0.006, 0.015]" in md
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| unet-")}
    assert "| best |" in lines["unet-full_te-frozen_vae-frozen"]
    assert NOT_SEPARABLE in lines["unet-lora_te-frozen_vae-frozen"]
    assert f"| {WORSE} |" in lines["unet-frozen_te-frozen_vae-frozen"]
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["vs best"] for r in table] == ["best", NOT_SEPARABLE, WORSE]
    assert table[1]["stats/js.ci_lo"] == "0.009" and table[1]["stats/js.ci_hi"] == "0.02"
    assert {"report.md", "report.csv"} <= set(tracker.logged)


def tagged(run_id, js, tags, unet="lora", status="FINISHED"):
    r = run(run_id, unet, js, js - 0.002, js + 0.002)
    r.info.status = status
    r.data.tags = tags
    return r


def anchor(kind, js):
    words = {"base": "base (untuned)", "real": "real (held out)"}[kind]
    r = tagged(f"anchor-{kind}", js, {"sar_ray.kind": "anchor", "sar_ray.anchor": kind, "sar_ray.strategy": words})
    r.data.params = {}
    return r


def trial(run_id, js, point, seed, unet="lora"):
    return tagged(run_id, js, {"sar_ray.trial_id": run_id, "sar_ray.params": json.dumps(point),
                               "sar_ray.seed": str(seed)}, unet)


def test_anchor_rows_realism_and_seed_replicas_grouped_into_one_row(tmp_path):
    """Anchors lead the table with realism 0 (untuned) and 1 (real); a point's seed replicas
    are one row (mean, spread), and rows name their trial by id and sampled values."""
    point = {"strategy.unet.mode": "lora", "strategy.unet.rank": 8, "train.lr": 3e-4}
    runs = [anchor("base", 0.5), anchor("real", 0.1),
            trial("t_00000", 0.20, point, 0), trial("t_00001", 0.30, point, 1),  # one point, two seeds
            trial("t_00002", 0.40, {"strategy.unet.mode": "full"}, 0, unet="full")]
    out = build_report(FakeTracker(runs), "parent", tmp_path, objective=ObjectiveConfig(metric="stats/js"))
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table[:2]] == ["base (untuned)", "real (held out)"]
    assert [float(r["realism"]) for r in table[:2]] == [0.0, 1.0]
    lora = next(r for r in table if r["strategy"].startswith("unet-lora"))
    assert lora["repeats"] == "2" and float(lora["stats/js"]) == pytest.approx(0.25)
    assert float(lora["stats/js.min"]) == 0.2 and float(lora["stats/js.max"]) == 0.3
    assert float(lora["stats/js.std"]) == pytest.approx(0.0707, abs=1e-4)
    assert float(lora["realism"]) == pytest.approx((0.5 - 0.25) / (0.5 - 0.1))
    assert lora["trial_id"] == "t_00000 t_00001" and "unet.rank=8" in lora["trial"] and "lr=0.0003" in lora["trial"]
    full = next(r for r in table if r["strategy"].startswith("unet-full"))
    assert full["trial"] == "t_00002 (unet.mode=full)" and full["repeats"] == "1"
    md = (out / "report.md").read_text()
    assert "| base (untuned) | - |" in md and "realism" in md and "`stats/js`" in md
    assert "± 0.07071 (0.2–0.3, n=2)" in md


def test_realism_falls_back_to_the_first_distance_when_the_objective_is_not_one():
    from sar_ray.report import realism, realism_metric

    assert realism_metric(ObjectiveConfig(metric="stats/wasserstein")) == "stats/wasserstein"
    fallback = realism_metric(ObjectiveConfig(metric="val_loss"))
    assert fallback.startswith("stats/")
    assert realism_metric(ObjectiveConfig(metric="clip/score", mode="max")) == fallback  # alignment, not a distance
    assert realism(0.5, 0.5, 0.1) == 0 and realism(0.1, 0.5, 0.1) == 1 and realism(0.3, 0.5, 0.5) is None
    assert realism(0.8, 0.6, 0.9) == pytest.approx(2 / 3)  # a metric to maximise: the same formula


def test_realism_of_a_val_loss_sweep_is_measured_on_a_family_the_study_computed(tmp_path):
    # A study with eval.metrics [glcm] ranked by val_loss: realism fell back to stats/js, which no
    # row has, so every realism cell was blank.
    from sar_ray.report import realism_metric

    assert realism_metric(ObjectiveConfig(metric="val_loss"), ["glcm"]) == "glcm/frechet"
    assert realism_metric(ObjectiveConfig(metric="val_loss"), ["stats", "glcm"]).startswith("stats/")

    def glcm_only(r, frechet):
        r.data.metrics = {"glcm/frechet": frechet, "val/loss": 0.1}
        return r

    runs = [glcm_only(anchor("base", 0), 4.0), glcm_only(anchor("real", 0), 1.0),
            glcm_only(trial("t_00000", 0, {"strategy.unet.mode": "lora"}, 0), 2.5)]
    out = build_report(FakeTracker(runs), "parent", tmp_path, objective=ObjectiveConfig(metric="val_loss"))
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[2]["realism"]) == pytest.approx(0.5)
    assert "on `glcm/frechet`" in (out / "report.md").read_text()


def test_a_sample_grid_title_keeps_the_whole_trial_label_inside_the_figure():
    # The quickstart's titles were one 120-character line, cut off at both edges of the figure.
    from sar_ray.report import grid_title

    label = ("b79d2_00003 (text_encoder={lr=0.001,mode=lora,rank=4}, token=learn, "
             "unet={lr=0.0005,mode=full})")
    title = grid_title("unet-full_te-lora_vae-frozen_tok", label, width=60)
    lines = title.split("\n")
    assert lines[0] == "unet-full_te-lora_vae-frozen_tok"
    assert all(len(line) <= 60 for line in lines)
    assert " ".join(lines[1:]) == label
    assert grid_title("base (untuned)", None) == "base (untuned)"


def test_sdxl_strategies_that_differ_only_in_the_second_text_encoder_keep_their_own_rows(tmp_path):
    """The runs log text_encoder_2 flat (strategy.text_encoder_2.mode) like every component:
    the report used to read a dict string that is never logged, so both became one strategy."""
    from sar_ray import config as C
    from sar_ray.tracking import _stringify

    runs = []
    for i, (te2, js) in enumerate((("frozen", 0.2), ("lora", 0.3))):
        strategy = C.StrategyConfig.model_validate(
            {"unet": {"mode": "lora"}, "text_encoder": {"mode": "lora"}, "text_encoder_2": {"mode": te2}})
        r = tagged(f"r{i}", js, {"sar_ray.trial_id": f"t_0000{i}", "sar_ray.params": "{}", "sar_ray.seed": "0"})
        r.data.params = {k: _stringify(v) for k, v in C.flatten(strategy, "strategy.").items()}
        runs.append(r)
    out = build_report(FakeTracker(runs), "parent", tmp_path, objective=ObjectiveConfig(metric="stats/js"))
    with open(out / "report.csv") as f:
        strategies = [r["strategy"] for r in csv.DictReader(f)]
    assert strategies == ["unet-lora_te-lora_te2-frozen_vae-frozen", "unet-lora_te-lora_te2-lora_vae-frozen"]


def test_only_seed_replicas_are_grouped_and_only_finished_ones_averaged():
    """Two trials of one point with the same seed (Optuna suggested it twice; grid passes)
    are two rows, not "2 seeds"; an ASHA-stopped replica neither hides its point (whatever
    order MLflow lists the runs in) nor enters the mean."""
    from sar_ray.report import TrialRow, group_points

    point, slug = {"train.lr": 1e-4}, "unet-lora_te-frozen_vae-frozen"

    def row(tid, seed, js, status="FINISHED"):
        metrics = {"val/loss": 0.5} if status != "FINISHED" else {"val/loss": 0.2, "stats/js": js}
        return TrialRow(f"run-{tid}", tid, slug, status, {}, metrics, trial_id=tid, point=point, seed=seed)

    twice = group_points([row("t_00000", 0, 0.1), row("t_00001", 0, 0.3)])
    assert sorted(r.metrics["stats/js"] for r in twice) == [0.1, 0.3]
    assert all(not r.repeats and "seeds" not in r.label for r in twice)

    stopped, done = row("t_00001", 1, None, status="KILLED"), row("t_00000", 0, 0.1)
    for order in ([stopped, done], [done, stopped]):
        (g,) = group_points(order)
        assert g.status == "FINISHED" and g.metrics["stats/js"] == 0.1 and g.metrics["val/loss"] == 0.2

    three = group_points([row("t_00000", 0, 0.1), row("t_00001", 1, 0.3), row("t_00002", 2, None, status="KILLED")])
    assert len(three) == 1 and len(three[0].repeats) == 2 and three[0].metrics["stats/js"] == pytest.approx(0.2)


def test_the_newest_finished_anchor_of_a_kind_is_the_one_read():
    """A resumed sweep that scored an anchor again (its scores file was lost) has two runs of
    that kind; MLflow lists the newest first, and that is the one the table reads."""
    from sar_ray.report import anchors_of, collect

    rows = collect(FakeTracker([anchor("base", 0.4), anchor("base", 0.5), anchor("real", 0.1)]), "parent")
    assert anchors_of(rows)["base"].metrics["stats/js"] == 0.4


def test_a_point_whose_other_seeds_asha_stopped_ranks_after_the_points_that_finished_every_seed(tmp_path):
    """search.repeats: 3 under ASHA: a point left with one lucky seed (the scheduler stopped
    the other two) showed that seed's value as if it were a mean and beat points whose every
    seed finished. It now ranks after them, and its row says `1 of 3 seeds`."""
    from sar_ray.report import PARTIAL

    lucky, steady = {"strategy.unet.mode": "lora", "train.lr": 1e-3}, {"strategy.unet.mode": "lora", "train.lr": 1e-4}
    runs = [trial("t_00000", 0.05, lucky, 0)]
    runs += [tagged(f"t_0000{s}", 0.5, {"sar_ray.trial_id": f"t_0000{s}", "sar_ray.params": json.dumps(lucky),
                                        "sar_ray.seed": str(s)}, status="KILLED") for s in (1, 2)]
    runs += [trial(f"t_0001{s}", js, steady, s) for s, js in enumerate((0.20, 0.22, 0.24))]
    # Another combination whose only point also lost a seed: it ranks after the complete one.
    other = {"strategy.unet.mode": "full"}
    runs += [trial("t_00020", 0.01, other, 0, unet="full"),
             tagged("t_00021", 0.5, {"sar_ray.trial_id": "t_00021", "sar_ray.params": json.dumps(other),
                                     "sar_ray.seed": "1"}, unet="full", status="KILLED")]
    out = build_report(FakeTracker(runs), "parent", tmp_path, objective=ObjectiveConfig(metric="stats/js"))
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == ["unet-lora_te-frozen_vae-frozen", "unet-full_te-frozen_vae-frozen"]
    assert table[0]["trial"].startswith("3 seeds") and float(table[0]["stats/js"]) == pytest.approx(0.22)
    assert table[1]["trial"].startswith("t_00020, 1 of 2 seeds") and table[1]["vs best"] == PARTIAL
    assert "`k of n seeds`" in (out / "report.md").read_text()
