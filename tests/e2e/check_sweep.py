"""Asserts, through the MLflow client, what a finished sweep must have left (used by .ci/e2e).

    python tests/e2e/check_sweep.py --tracking-uri http://127.0.0.1:5055 --experiment sar-ci \
        --folder /tmp/x/sweep --trials 4 [--finished-before before.json] [--no-scores]

Exits non-zero with a message naming what is missing.
"""

import argparse
import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient


def fail(msg: str) -> None:
    print(f"check_sweep: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--folder", required=True, help="the sweep folder (--out)")
    ap.add_argument("--trials", type=int, required=True)
    ap.add_argument("--finished-before", help="json {trial_id: summary mtime} taken before a resume")
    ap.add_argument("--no-scores", action="store_true", help="the sweep ran with search.evaluate=false")
    a = ap.parse_args()

    client = MlflowClient(a.tracking_uri)
    exp = client.get_experiment_by_name(a.experiment)
    if exp is None:
        fail(f"no experiment {a.experiment!r} on {a.tracking_uri}")
    folder = Path(a.folder)
    parent_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    parents = client.search_runs([exp.experiment_id], "tags.`sar_ray.kind` = 'sweep'")
    if [p.info.run_id for p in parents if p.data.tags.get("sar_ray.folder") == str(folder)] != [parent_id]:
        fail(f"expected exactly one parent run for {folder}, got {[p.info.run_id for p in parents]}")
    parent = client.get_run(parent_id)
    if parent.info.status != "FINISHED" or "sar_ray.best_trial" not in parent.data.tags:
        fail(f"parent run {parent_id}: status {parent.info.status}, tags {sorted(parent.data.tags)}")
    arts = {x.path for x in client.list_artifacts(parent_id, "report")}
    if "report/report.md" not in arts:
        fail(f"parent run has no report: {arts}")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    # The anchor rows (base (untuned), real (held out)) are child runs too: once each, also after a resume.
    anchors = [ch.data.tags.get("sar_ray.anchor") for ch in children if ch.data.tags.get("sar_ray.kind") == "anchor"]
    children = [ch for ch in children if ch.data.tags.get("sar_ray.kind") != "anchor"]
    if len(anchors) != len(set(anchors)) or (not a.no_scores and "base" not in anchors):
        fail(f"expected one base (and at most one real) anchor run, got {anchors}")
    if len(children) != a.trials:
        fail(f"expected {a.trials} child runs, got {len(children)} (duplicates after a resume?)")
    for ch in children:
        name = ch.info.run_name
        if ch.info.status != "FINISHED":
            fail(f"child {name}: status {ch.info.status}")
        wanted = {"train/loss", "val/loss", "cost/wall_s"} | (set() if a.no_scores else {"stats/wasserstein"})
        if not wanted <= set(ch.data.metrics):
            fail(f"child {name}: metrics {sorted(ch.data.metrics)}")
        grids = {x.path for x in client.list_artifacts(ch.info.run_id, "samples/final")}
        if "samples/final/grid.png" not in grids:
            fail(f"child {name}: no sample grid")
    trial_dirs = sorted(p for p in (folder / "trials").iterdir() if p.is_dir())
    if len(trial_dirs) != a.trials:
        fail(f"expected {a.trials} trial folders, got {[p.name for p in trial_dirs]}")
    for d in trial_dirs:
        if not (d / "summary.json").is_file():
            fail(f"trial {d.name} did not finish")
    if a.finished_before:
        before = json.loads(Path(a.finished_before).read_text())
        if not before:
            fail("no trial had finished before the driver was killed; the resume test proved nothing")
        for tid, mtime in before.items():
            now = (folder / "trials" / tid / "summary.json").stat().st_mtime
            if now != mtime:
                fail(f"trial {tid} finished before the kill but ran again after --resume")
    print(f"check_sweep: ok: 1 parent, {len(children)} finished child runs with metrics and sample grids, "
          f"anchors {sorted(anchors)}"
          + (f"; {len(json.loads(Path(a.finished_before).read_text()))} trials finished before the kill were not rerun"
             if a.finished_before else ""))


if __name__ == "__main__":
    main()
