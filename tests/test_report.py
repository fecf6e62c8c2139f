"""The strategy comparison report: intervals beside the values, and which strategies the data
cannot tell apart from the best."""

import csv
from types import SimpleNamespace

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
