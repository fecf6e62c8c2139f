"""Sweeps: the search space, resources, and whole sweeps through Ray Tune and MLflow."""

import csv
import json
from pathlib import Path

import optuna
import pytest

from sar_ray import config
from sar_ray.config import ConfigError
from sar_ray.sweep import _define_by_run, concurrent_trials, grid_points, run_sweep, summary

PROMPT = '["<SAR> image of a forest"]'


def study(tmp_path: Path, space: dict, *sets: str, name: str = "s"):
    return config.load(None, [
        "model.pretrained=tiny-sd", f"name={name}", f"out={tmp_path / name}",
        "data.synthetic.n=16", "data.synthetic.size=32", "data.resolution=32", "data.val_fraction=0.25",
        "train.max_steps=2", "train.batch_size=2", "train.eval_every=1", "train.checkpoint_every=2",
        "train.eval_batches=1", f"sample.prompts={PROMPT}", "sample.seeds=[0]", "sample.steps=1",
        "scaling.cpus_per_worker=0.5", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=sw",
        # Anchor rows cost a sampling and two scorings per sweep: on where a test asks for them.
        f"search={json.dumps({'space': space, 'anchors': False})}", *sets,
    ])


def test_a_resumed_asha_judges_against_the_rungs_the_first_run_recorded(tmp_path):
    """Tune saves no scheduler state: before, a resumed ASHA had empty rungs and let the first
    trial to reach each one go on, however bad. The driver keeps the rungs in the sweep folder
    as ASHA records them, and --resume puts them back."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from sar_ray.sweep import RUNGS_FILE, _RungKeeper, _tune_pieces, load_rungs

    s = study(tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-3]}}, "search.algorithm=optuna",
              "search.scheduler.type=asha", "search.scheduler.grace_period=2", "search.scheduler.reduction_factor=2",
              "search.evaluate=false", "train.max_steps=8", "train.eval_every=2")
    path = tmp_path / RUNGS_FILE

    def report(scheduler, trial_id, step, val_loss):
        t = SimpleNamespace(trial_id=trial_id)
        if trial_id not in scheduler._trial_info:
            scheduler.on_trial_add(None, t)
        return scheduler.on_trial_result(None, t, {"step": step, "val_loss": val_loss})

    first = _tune_pieces(s, s.trial())[2]
    keeper = _RungKeeper(first, path)
    for tid, losses in {"t0": [0.5, 0.4, 0.3], "t1": [0.6, 0.5], "t2": [0.4]}.items():  # val_loss at steps 2, 4, 6
        report(first, tid, 1, float("nan"))  # before the first rung: recorded nowhere
        for k, v in enumerate(losses):
            report(first, tid, 2 * (k + 1), v)
            keeper.on_step_begin(0, [])
    assert not path.with_suffix(".tmp").exists()

    fresh = _tune_pieces(s, s.trial())[2]
    assert report(fresh, "new", 2, 9.0) == TrialScheduler.CONTINUE  # what a resume did: no one to compare with
    resumed = _tune_pieces(s, s.trial())[2]
    assert load_rungs(resumed, path) == 5
    rungs = {m: dict(r) for m, r in resumed._brackets[0]._rungs}
    assert rungs[2] == {"t0": -0.5, "t1": -0.6, "t2": -0.4} and rungs[4] == {"t0": -0.4, "t1": -0.5}
    assert report(resumed, "new", 2, 9.0) == TrialScheduler.STOP
    assert report(resumed, "t1", 4, 0.5) == TrialScheduler.CONTINUE  # passed rung 4 before the kill: not judged again
    assert load_rungs(_tune_pieces(s, s.trial())[2], tmp_path / "nothing.json") == 0


def test_grid_expands_lora_only_keys_only_where_the_component_is_lora(tmp_path):
    s = study(tmp_path, {"strategy.unet.mode": {"grid": ["full", "lora"]}, "strategy.unet.rank": {"grid": [4, 8]},
                         "strategy.token": {"grid": ["none", "learn"]}}, "search.algorithm=grid")
    points = grid_points(s.search, s.trial())
    assert len(points) == 6  # (full, lora4, lora8) x (none, learn): no rank copies of the full UNet
    assert sum(1 for p in points if p["strategy.unet.mode"] == "full" and "strategy.unet.rank" in p) == 0
    slugs = {s.trial(**p).strategy.slug for p in points}
    assert len(slugs) == 6


def test_optuna_space_suggests_rank_only_for_lora(tmp_path):
    s = study(tmp_path, {"strategy.unet.mode": {"choice": ["full", "lora"]}, "strategy.unet.rank": {"choice": [4, 16]},
                         "strategy.unet.lr": {"loguniform": [1e-5, 1e-3]}})
    define = _define_by_run(s.search, s.trial())
    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        t = st.ask()
        define(t)
        assert ("strategy.unet.rank" in t.params) == (t.params["strategy.unet.mode"] == "lora")
        assert 1e-5 <= t.params["strategy.unet.lr"] <= 1e-3
        seen.add(t.params["strategy.unet.mode"])
    assert seen == {"full", "lora"}


def test_grid_leaves_out_points_that_cannot_train(tmp_path):
    s = study(tmp_path, {"strategy.unet.mode": {"grid": ["frozen", "lora"]},
                         "strategy.token": {"grid": ["none", "learn"]}}, "search.algorithm=grid")
    points = grid_points(s.search, s.trial())
    assert {"strategy.unet.mode": "frozen", "strategy.token": "none"} not in points
    assert len(points) == 3


def test_optuna_objective_from_the_final_report_only(tmp_path, monkeypatch, ray_local):
    # stats/wasserstein exists only after scoring, in the last report; intermediate reports
    # carry val_loss alone. The search must still rank trials by it.
    # One point with search.repeats=2: two trials of the same sampled values, seeds 0 and 1,
    # one grouped report row with the mean and spread.
    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {"strategy.unet.rank": {"choice": [4, 8]}}, "search.algorithm=optuna",
              "search.num_samples=1", "search.repeats=2", "search.scheduler.type=none",
              'search.objectives=[{"metric": "stats/wasserstein", "mode": "min"}]', name="o")
    r = run_sweep(s, progress=False)
    assert [t["status"] for t in r.trials] == ["DONE", "DONE"]
    # The best is the point, on its mean over the seeds (as the report ranks), not one seed.
    assert r.best is not None and r.best["metrics"]["stats/wasserstein"] == pytest.approx(
        sum(t["metrics"]["stats/wasserstein"] for t in r.trials) / 2)
    assert sorted(r.best["trials"]) == sorted(t["trial_id"] for t in r.trials)
    assert r.trials[0]["params"] == r.trials[1]["params"] and sorted(t["seed"] for t in r.trials) == [0, 1]
    seeds = [config.load(r.folder / "trials" / t["trial_id"] / "config.yaml").train.seed for t in r.trials]
    assert sorted(seeds) == [0, 1]  # the replicas really trained with seeds train.seed + k
    with open(r.folder / "report" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and table[0]["repeats"] == "2"
    values = sorted(t["metrics"]["stats/wasserstein"] for t in r.trials)
    assert float(table[0]["stats/wasserstein"]) == pytest.approx(sum(values) / 2, rel=1e-3)
    assert float(table[0]["stats/wasserstein.min"]) == pytest.approx(values[0], rel=1e-3)


def test_a_held_out_set_overlapping_the_training_images_is_refused_before_any_run(tmp_path, monkeypatch, capsys,
                                                                                 ray_local):
    import shutil

    from sar_ray.cli import main
    from sar_ray.data.synth import synthetic_path

    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {}, name="h")
    given = tmp_path / "held"
    shutil.copytree(synthetic_path(s.data.synthetic), given)  # every image, training ones included
    yaml_path = tmp_path / "h.yaml"
    yaml_path.write_text(config.dump_yaml(s))
    code = main(["sweep", str(yaml_path), "-q", "--set", "search.anchors=true", "--set", f"search.holdout={given}"])
    err = capsys.readouterr().err
    assert code == 2 and "shares" in err and "training data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h" / "mlflow_run.json").exists()  # refused before the parent run


def test_search_section_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'strategy.unet.rnak' is not a trial setting"):
        study(tmp_path, {"strategy.unet.rnak": {"choice": [4]}})
    with pytest.raises(ConfigError, match="exactly one of"):
        study(tmp_path, {"train.lr": {"choice": [1e-4], "loguniform": [1e-5, 1e-3]}})
    with pytest.raises(ConfigError, match="grid needs grid/choice axes"):
        study(tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-3]}}, "search.algorithm=grid")
    with pytest.raises(ConfigError, match="multi-objective"):
        study(tmp_path, {}, 'search.objectives=[{"metric": "val_loss"}, {"metric": "stats/js"}]')
    # The sweep's real sets are split once: a trial splitting otherwise would train on held-out images.
    for key in ("data.val_fraction", "data.holdout_fraction"):
        with pytest.raises(ConfigError, match=f"'{key}' cannot vary between trials: .*held-out"):
            study(tmp_path, {key: {"grid": [0.05, 0.2]}}, "search.algorithm=grid")
    # ... also from a whole-section axis, which slipped past the key check.
    with pytest.raises(ConfigError, match="'data' cannot vary data.val_fraction between trials"):
        study(tmp_path, {"data": {"grid": [{"resolution": 16}, {"resolution": 32, "val_fraction": 0.3}]}},
              "search.algorithm=grid")
    study(tmp_path, {"data.resolution": {"grid": [16, 32]}}, "search.algorithm=grid")  # other data keys may vary


def test_an_objective_is_a_final_metric_the_sweep_computes_and_ranks_the_right_way(tmp_path):
    """A typo in an objective validated, and every trial ended without an objective value (Optuna
    learned nothing, the summary had no best); so did a family not in eval.metrics, an
    objective with search.evaluate false, and a quick/* rung signal (a stopped trial's rung value
    became its result). mode max on a distance crowned the least realistic trial."""
    def objective(metric: str, mode: str = "min", *sets: str):
        return study(tmp_path, {}, f'search.objectives=[{{"metric": "{metric}", "mode": "{mode}"}}]', *sets)

    with pytest.raises(ConfigError, match=r"'stats/wasserstien' is not reported by a trial \(did you mean 'stats/wasserstein'"):
        objective("stats/wasserstien")
    with pytest.raises(ConfigError, match="rung signal .* use 'stats/js'"):
        objective("quick/stats/js")
    with pytest.raises(ConfigError, match="'stats/js' is better lower: set mode: min"):
        objective("stats/js", "max")
    with pytest.raises(ConfigError, match="'clip' family is not in eval.metrics"):
        objective("clip/score", "max")
    with pytest.raises(ConfigError, match="search.evaluate is false"):
        objective("stats/js", "min", "search.evaluate=false")
    for metric, mode in (("val_loss", "min"), ("stats/kl/forest", "min"), ("glcm/frechet", "min"),
                         ("cost/gpu_hours", "min"), ("stats/js", "min")):
        objective(metric, mode)
    with pytest.raises(ConfigError, match="'glcm' family is not in eval.metrics"):
        objective("glcm/frechet", "min", "eval.metrics=[stats]")
    objective("val_loss", "min", "search.evaluate=false")


def test_under_asha_every_point_shares_the_base_trials_rungs(tmp_path):
    """ASHA's rungs and max_t come from the base train.max_steps: a point of 4 steps among 8 was
    judged (and stopped) at its own last report, unsaved and unscored; a quick metric's rungs are
    aligned with the base train.sample_every, so another cadence was judged on a stale value."""
    asha = ("search.scheduler.type=asha", "search.scheduler.grace_period=2", "train.max_steps=8")
    with pytest.raises(ConfigError, match="'train.max_steps' varies train.max_steps under ASHA"):
        study(tmp_path, {"train.max_steps": {"grid": [8, 4]}}, "search.algorithm=grid", *asha)
    quick = (*asha, "search.scheduler.metric=quick/stats/js", "train.sample_every=2")
    with pytest.raises(ConfigError, match="'train' varies train.sample_every under ASHA"):
        study(tmp_path, {"train": {"grid": [{"sample_every": 2}, {"sample_every": 4}]}}, "search.algorithm=grid", *quick)
    study(tmp_path, {"train.sample_every": {"grid": [2, 4]}}, "search.algorithm=grid", *asha)  # val_loss rungs
    study(tmp_path, {"train.max_steps": {"grid": [8, 4]}}, "search.algorithm=grid", "search.scheduler.type=none")


def test_concurrency_follows_cluster_resources_and_leaves_a_cpu_for_data(tmp_path):
    s = study(tmp_path, {})
    assert concurrent_trials(s.trial(), s.search, {"CPU": 2}) == 2  # 0.5 CPU per trial, 1 CPU kept
    gpu = s.trial(**{"scaling.num_workers": 2, "scaling.use_gpu": True, "scaling.cpus_per_worker": 4})
    assert concurrent_trials(gpu, s.search, {"CPU": 64, "GPU": 8}) == 4  # 2 GPUs per trial
    with pytest.raises(ConfigError, match="set search.max_concurrent_trials"):  # no GPU node up yet
        concurrent_trials(gpu, s.search, {"CPU": 16})
    pinned = study(tmp_path, {}, "search.max_concurrent_trials=3")
    assert concurrent_trials(pinned.trial(), pinned.search, {"CPU": 2}) == 3


def _cluster_config(*groups, max_resources=None):
    """An autoscaler's ClusterConfig as the GCS holds it: (name, resources, min, max) per node type."""
    from ray.core.generated import autoscaler_pb2 as pb

    return pb.ClusterConfig(
        node_group_configs=[pb.NodeGroupConfig(name=n, resources=r, min_count=lo, max_count=hi) for n, r, lo, hi in groups],
        max_resources=max_resources or {})


def test_concurrency_on_an_autoscaling_cluster_follows_its_maximum_worker_counts(tmp_path, monkeypatch):
    """Before: with no GPU node up the sweep had to be told a limit, and with one node up the
    limit froze at that node's size for the whole sweep."""
    import ray._private.state

    from sar_ray.sweep import autoscaler_limits

    s = study(tmp_path, {})
    gpu = s.trial(**{"scaling.num_workers": 2, "scaling.use_gpu": True, "scaling.cpus_per_worker": 4})
    config = _cluster_config(("head", {"CPU": 8, "trial_driver": 100}, 0, 0),
                             ("gpu-8x", {"CPU": 64, "GPU": 8}, 0, 4))
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    limits = autoscaler_limits()
    assert limits["autoscales"] and limits["max"]["GPU"] == 32
    assert concurrent_trials(gpu, s.search, {"CPU": 8}, limits) == 16  # no GPU node up: 4 nodes x 8 GPUs / 2
    assert concurrent_trials(gpu, s.search, {"CPU": 72, "GPU": 8}, limits) == 16  # one up: still the maximum
    capped = _cluster_config(("gpu-8x", {"CPU": 64, "GPU": 8}, 0, 4), max_resources={"GPU": 12})
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: capped)
    assert concurrent_trials(gpu, s.search, {"CPU": 8}, autoscaler_limits()) == 6
    unbounded = _cluster_config(("gpu-8x", {"CPU": 64, "GPU": 8}, 0, -1))
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: unbounded)
    with pytest.raises(ConfigError, match="no maximum GPU worker count; set search.max_concurrent_trials"):
        concurrent_trials(gpu, s.search, {"CPU": 8}, autoscaler_limits())
    assert concurrent_trials(gpu, s.search, {"CPU": 72, "GPU": 8}, autoscaler_limits()) == 4  # what is up
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)  # no autoscaler
    assert autoscaler_limits() is None
    with pytest.raises(ConfigError, match="set search.max_concurrent_trials"):
        concurrent_trials(gpu, s.search, {"CPU": 8}, autoscaler_limits())


def test_an_autoscaling_cluster_counts_as_several_nodes_for_paths(tmp_path):
    from sar_ray.sweep import check_cluster_paths, limits_from_config

    fixed = limits_from_config(_cluster_config(("head", {"CPU": 8}, 1, 1)))
    growing = limits_from_config(_cluster_config(("head", {"CPU": 8}, 1, 1), ("gpu", {"GPU": 8}, 0, 2)))
    assert not fixed["autoscales"] and growing["autoscales"]
    check_cluster_paths(study(tmp_path, {}, "out=runs/x"), nodes=1, autoscales=False)
    with pytest.raises(ConfigError, match="on an autoscaling cluster .*absolute path"):
        check_cluster_paths(study(tmp_path, {}, "out=runs/x"), nodes=1, autoscales=True)


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return c, c.get_experiment_by_name("sw").experiment_id


@pytest.mark.slow  # a sweep, then its resume: ~65 s on 2 cores
def test_grid_sweep_logs_parent_and_children_and_resume_adds_no_duplicates(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {"strategy.unet.mode": {"grid": ["full", "lora"]}}, "search.algorithm=grid",
              "search.scheduler.type=none", 'search.objectives=[{"metric": "stats/wasserstein"}]',
              "search.anchors=true")
    r = run_sweep(s, resume=True, progress=False)  # nothing to resume yet: --resume starts it
    assert [t["status"] for t in r.trials] == ["DONE", "DONE"]
    assert r.best is not None and "stats/wasserstein" in r.best["metrics"]
    client, exp = _client(tmp_path)
    parent = client.get_run(r.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sar_ray.best_trial"] == r.best["trial_id"]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{r.parent_run_id}'")
    anchors = {ch.data.tags["sar_ray.anchor"]: ch for ch in children if ch.data.tags.get("sar_ray.kind") == "anchor"}
    children = [ch for ch in children if ch.data.tags.get("sar_ray.kind") != "anchor"]
    assert len(children) == 2 and set(anchors) == {"base", "real"}
    # Anchors: scored like a trial, once, logged on their own runs and on the parent.
    base_w, real_w = (anchors[k].data.metrics["stats/wasserstein"] for k in ("base", "real"))
    assert parent.data.metrics["anchor/base/stats/wasserstein"] == pytest.approx(base_w)
    assert parent.data.metrics["anchor/real/stats/wasserstein"] == pytest.approx(real_w)
    assert real_w < base_w  # real held-out SAR is closer to the reference than a random model's samples
    assert "samples/final/grid.png" in [a.path for a in client.list_artifacts(anchors["base"].info.run_id, "samples/final")]
    with open(r.folder / "report" / "report.csv") as f:
        table = {row["strategy"]: row for row in csv.DictReader(f)}
    assert float(table["base (untuned)"]["realism"]) == 0 and float(table["real (held out)"]["realism"]) == 1
    for t in r.trials:  # each trial row names its trial and its sampled value, with its realism
        row = next(v for v in table.values() if v["trial_id"] == t["trial_id"])
        assert f"unet.mode={t['params']['strategy.unet.mode']}" in row["trial"] and t["trial_id"] in row["trial"]
        assert float(row["realism"]) == pytest.approx((base_w - t["metrics"]["stats/wasserstein"]) / (base_w - real_w),
                                                     rel=1e-3)
    md = (r.folder / "report" / "report.md").read_text()
    assert "| base (untuned) |" in md and "| real (held out) |" in md and "realism" in md
    text = summary(r, "stats/wasserstein")
    assert "base (untuned)" in text and "real (held out)" in text and r.trials[0]["trial_id"] in text
    assert "  splits    reference: the " in text  # where the real sets came from, also on the parent run
    assert parent.data.tags["sar_ray.splits"].startswith("reference: the ")
    # The held-out images: none is a training image (by name), and the reference is the training split.
    held = [json.loads(x)["file_name"] for x in (r.folder / "splits" / "holdout" / "metadata.jsonl").read_text().splitlines()]
    ref = [json.loads(x)["file_name"] for x in (r.folder / "splits" / "reference" / "metadata.jsonl").read_text().splitlines()]
    assert held and ref and not set(held) & set(ref)
    for ch in children:
        assert ch.info.status == "FINISHED"
        assert {"train/loss", "val/loss", "stats/wasserstein", "cost/wall_s", "cost/trainable_params"} <= set(ch.data.metrics)
        grid = [a.path for a in client.list_artifacts(ch.info.run_id, "samples/final")]
        assert "samples/final/grid.png" in grid
    reports = {a.path for a in client.list_artifacts(r.parent_run_id, "report")}
    assert {"report/report.md", "report/report.csv"} <= reports
    assert (r.folder / "report" / "report.md").read_text().count("| unet-") == 2
    # `sar-ray report --experiment sw` (no --metric) rebuilds it ranked as the sweep ranked: by its
    # objective, not by the validation loss.
    from sar_ray.report import build_report
    from sar_ray.tracking import Tracker

    rebuilt = build_report(Tracker(f"sqlite:///{tmp_path}/mlflow.db", "sw"), None, tmp_path / "rebuilt")
    assert "its best search point by `stats/wasserstein`, min" in (rebuilt / "report.md").read_text()

    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(s, progress=False)  # the folder holds this sweep: refuse to overwrite it
    again = run_sweep(s, resume=True, progress=False)
    assert sorted(t["trial_id"] for t in again.trials) == sorted(t["trial_id"] for t in r.trials)
    assert again.parent_run_id == r.parent_run_id
    assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{r.parent_run_id}'")) == 4  # 2 trials, 2 anchors
    assert {k: a["run_id"] for k, a in again.anchors.items()} == {k: a.info.run_id for k, a in anchors.items()}
    assert len(client.search_runs([exp], "tags.`sar_ray.kind` = 'sweep'")) == 1
    # --fresh deletes the earlier sweep and starts over: a new parent run, new trials
    fresh = run_sweep(s, fresh=True, progress=False)
    assert fresh.parent_run_id != r.parent_run_id and len(fresh.trials) == 2
    assert not set(t["trial_id"] for t in fresh.trials) & set(t["trial_id"] for t in r.trials)
    other = study(tmp_path, {"strategy.unet.mode": {"grid": ["full", "lora"]}}, "search.algorithm=grid",
                  "search.scheduler.type=none", "train.lr=3e-4")  # another study, the same folder
    with pytest.raises(ConfigError, match="holds a sweep of another study"):
        run_sweep(other, resume=True, progress=False)


@pytest.mark.slow  # two trials, one crashing and retried: ~60 s on 2 cores
def test_a_failing_trial_does_not_stop_the_others(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {"train.lr": {"grid": [1e-4, 1e30]}}, "search.algorithm=grid", "search.scheduler.type=none",
              "search.max_failures=2", "search.evaluate=false", "train.max_grad_norm=null",
              "strategy.unet.mode=full", "train.max_steps=6", "train.checkpoint_every=6", name="f")
    r = run_sweep(s, progress=False)
    status = {t["params"]["train.lr"]: t["status"] for t in r.trials}
    assert status == {1e-4: "DONE", 1e30: "ERROR"}
    bad = next(t for t in r.trials if t["status"] == "ERROR")
    assert "loss is" in bad["error"]
    # A divergence is not retried into training (max_failures=2): its log has one start only.
    from sar_ray.trial import read_log

    log = read_log(r.folder / "trials" / bad["trial_id"] / "train_log.jsonl")
    assert sum(1 for rec in log if rec.get("event") == "start") == 1
    client, exp = _client(tmp_path)
    statuses = sorted(ch.info.status for ch in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{r.parent_run_id}'"))
    assert statuses == ["FAILED", "FINISHED"]

    # --resume runs the errored trial again, under this driver's callbacks: its live table shows
    # the trial (Tune restored the table it pickled at the start, which no display showed), and
    # it gets the search.max_failures given now as more retries (Tune kept the first run's 2,
    # all spent: the resumed trial failed once and stopped).
    import io

    from rich.console import Console

    (errors,) = (r.folder / "tune" / "f").glob("*/error.txt")
    assert errors.read_text().count("Failure # ") == 3  # the first try and max_failures=2 retries
    out = io.StringIO()
    again = run_sweep(s.model_copy(update={"search": s.search.model_copy(update={"max_failures": 1})}), resume=True,
                      progress=True, console=Console(file=out, width=250))
    assert {t["params"]["train.lr"]: t["status"] for t in again.trials} == {1e-4: "DONE", 1e30: "ERROR"}
    assert errors.read_text().count("Failure # ") == 5  # resumed, and one retry
    assert bad["trial_id"] in out.getvalue() and "ERROR" in out.getvalue()


@pytest.mark.slow
def test_asha_stops_trials_and_they_release_their_resources(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    # A continuous lr: with a categorical one, seeded TPE drew lr=1e-6 three times, three trials
    # tied on val_loss at every rung (0.81228) and ASHA's median cutoff stopped none of the 6.
    s = study(tmp_path, {"train.lr": {"loguniform": [1e-5, 3e-3]}, "strategy.unet.rank": {"choice": [4, 8]}},
              "search.algorithm=optuna", "search.num_samples=6", "search.scheduler.type=asha",
              "search.scheduler.grace_period=2", "search.evaluate=false", "train.max_steps=8",
              "train.eval_every=2", "train.checkpoint_every=8", name="asha")
    r = run_sweep(s, progress=False)
    assert len(r.trials) == 6
    assert {t["status"] for t in r.trials} <= {"DONE", "STOPPED"}
    assert any(t["status"] == "STOPPED" for t in r.trials), "ASHA stopped no trial"
    done = [t for t in r.trials if t["status"] == "DONE"]
    assert done and all(t["metrics"]["step"] == 8 for t in done)  # survivors train, save and sample to the end
    assert all((r.folder / "trials" / t["trial_id"] / "weights").is_dir() for t in done)
    # Stopped trials gave their CPUs back: every later trial could start, and nothing is held now.
    avail, total = ray_local.available_resources(), ray_local.cluster_resources()
    assert avail.get("CPU", 0) == pytest.approx(total["CPU"])
    client, exp = _client(tmp_path)
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{r.parent_run_id}'")
    assert len(runs) == 6 and all(x.info.status in ("FINISHED", "KILLED") for x in runs)


@pytest.mark.slow
def test_asha_over_train_worker_groups_on_one_shared_storage_path(tmp_path, monkeypatch, ray_local):
    """The cluster configuration: each trial a Ray Train worker group, ASHA, one storage_path.
    Before: a reused trial actor hung the sweep (the stopped trial was still inside fit()), and
    trials that differ only in lr resumed from one another's checkpoints (one Train run name)."""
    from sar_ray.trial import read_log

    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {"train.lr": {"grid": [1e-6, 1e-5, 1e-4, 1e-3]}}, "search.algorithm=grid",
              "search.scheduler.type=asha", "search.scheduler.grace_period=2", "search.evaluate=false",
              "search.max_concurrent_trials=1", "search.max_failures=0", "scaling.num_workers=1",
              "train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=2",
              f"scaling.storage_path={tmp_path / 'shared'}", name="cluster")
    r = run_sweep(s, progress=False)
    assert len(r.trials) == 4 and {t["status"] for t in r.trials} <= {"DONE", "STOPPED"}, r.trials
    assert any(t["status"] == "STOPPED" for t in r.trials), "ASHA stopped no trial"
    for t in r.trials:
        log = read_log(r.folder / "trials" / t["trial_id"] / "train_log.jsonl")
        assert log[0]["event"] == "start" and log[0]["step"] == 0, t["trial_id"]
        assert not any(rec.get("event") == "resumed" for rec in log), f"{t['trial_id']} resumed another trial's run"
    runs = sorted(p.name for p in (tmp_path / "shared").iterdir() if p.is_dir())
    assert runs == sorted(f"cluster-{t['trial_id']}" for t in r.trials)  # one Train run per trial
    # Stopped trials' worker groups end with their actors (asynchronously): all CPUs come back.
    import time

    for _ in range(60):
        if ray_local.available_resources().get("CPU", 0) == pytest.approx(ray_local.cluster_resources()["CPU"]):
            break
        time.sleep(1)
    assert ray_local.available_resources().get("CPU", 0) == pytest.approx(ray_local.cluster_resources()["CPU"])


def test_a_typo_inside_a_grid_value_is_refused_at_load_naming_the_point(tmp_path):
    """Before: `_valid` swallowed the error and those grid points vanished (35 trials, not 53)."""
    space = {"strategy.unet": {"grid": [{"mode": "full"}, {"mode": "lora", "rnak": 32, "lr": 1e-4}]}}
    with pytest.raises(ConfigError, match=r"the point .*\"rnak\": 32.* strategy\.unet\.rnak: unknown key \(did you mean 'rank'\?\)"):
        study(tmp_path, space, "search.algorithm=grid")
    with pytest.raises(ConfigError, match=r"strategy\.unet\.rank: must be > 0"):  # optuna: categorical values too
        study(tmp_path, {"strategy.unet.rank": {"choice": [4, -1]}, "train.lr": {"loguniform": [1e-5, 1e-3]}})


def test_check_search_counts_trials_and_the_points_left_out(tmp_path):
    from sar_ray.sweep import check_search

    s = study(tmp_path, {"strategy.unet.mode": {"grid": ["frozen", "lora"]}, "strategy.token": {"grid": ["none", "learn"]}},
              "search.algorithm=grid", "search.num_samples=2")
    assert check_search(s) == (6, 1)  # 3 points that train x 2 repeats; all-frozen-no-token left out
    paper = config.load(Path(__file__).resolve().parents[1] / "sweeps" / "paper.yaml")
    assert check_search(paper) == (53, 1)


def test_paths_that_resolve_on_one_node_are_refused_on_a_cluster(tmp_path):
    from sar_ray.sweep import check_cluster_paths

    s = study(tmp_path, {}, "out=runs/x")
    check_cluster_paths(s, nodes=1)  # one machine: anything goes
    with pytest.raises(ConfigError, match="absolute path on storage every node mounts"):
        check_cluster_paths(s, nodes=3)
    sqlite = study(tmp_path, {})  # absolute out, sqlite tracking
    with pytest.raises(ConfigError, match="trials log from other nodes"):
        check_cluster_paths(sqlite, nodes=2)
    check_cluster_paths(study(tmp_path, {}, "tracking.uri=http://10.0.0.1:5000"), nodes=2)


def test_trial_drivers_ask_for_the_stable_node_resource_only_where_it_exists(tmp_path):
    from sar_ray.sweep import trial_resources

    s = study(tmp_path, {})
    workers = s.trial(**{"scaling.num_workers": 2})
    assert trial_resources(workers, {"CPU": 16, "trial_driver": 100}) == {"CPU": 0.1, "trial_driver": 0.01}
    assert trial_resources(workers, {"CPU": 16}) == {"CPU": 0.1}  # a local Ray or a cluster without it
    assert trial_resources(s.trial(), {"CPU": 2, "trial_driver": 100}) == {"CPU": 0.5}  # local mode: it trains


def test_asha_survives_trials_without_validation_images(tmp_path, monkeypatch, ray_local):
    """With no validation images there is no val_loss: the final report used to carry
    val_loss None, and ASHA's arithmetic on it ended the whole sweep with a TypeError."""
    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {"train.lr": {"grid": [1e-4, 1e-3]}}, "search.algorithm=grid", "search.scheduler.type=asha",
              "search.scheduler.grace_period=1", "search.evaluate=false", "data.val_fraction=0", name="noval")
    r = run_sweep(s, progress=False)
    assert len(r.trials) == 2 and {t["status"] for t in r.trials} <= {"DONE", "STOPPED"}, r.trials


def _row(tid, js, repeat=0, point=None, status="DONE"):
    return {"trial_id": tid, "params": point or {"train.lr": 1e-4}, "repeat": repeat, "seed": repeat,
            "strategy": "unet-full_te-frozen_vae-frozen", "status": status, "metrics": {"stats/js": js}}


def test_with_repeats_the_sweeps_best_is_the_best_point_on_its_seed_mean_not_the_luckiest_seed():
    from sar_ray.config import SearchConfig
    from sar_ray.sweep import _best

    rows = [_row("a0", 0.10, 0, {"train.lr": 1e-4}), _row("a1", 0.50, 1, {"train.lr": 1e-4}),  # mean 0.30
            _row("b0", 0.20, 0, {"train.lr": 1e-3}), _row("b1", 0.22, 1, {"train.lr": 1e-3})]  # mean 0.21
    search = SearchConfig(repeats=2, objectives=[{"metric": "stats/js", "mode": "min"}])
    best = _best(rows, search)
    assert best["trials"] == ["b0", "b1"] and best["metrics"]["stats/js"] == pytest.approx(0.21)
    assert _best(rows, search.model_copy(update={"repeats": 1}))["trial_id"] == "a0"


def test_with_repeats_a_point_that_lost_seeds_to_asha_is_not_the_best_over_one_that_finished_them():
    """ASHA stopped a1: a's mean was its one lucky seed (0.05), and it beat b, whose both seeds
    finished (0.21). The best is the complete point; without one, the partial point says so."""
    from sar_ray.config import SearchConfig
    from sar_ray.sweep import SweepResult, _best, summary

    rows = [_row("a0", 0.05, 0, {"train.lr": 1e-3}), _row("a1", None, 1, {"train.lr": 1e-3}, status="STOPPED"),
            _row("b0", 0.20, 0, {"train.lr": 1e-4}), _row("b1", 0.22, 1, {"train.lr": 1e-4})]
    rows[1]["metrics"] = {}
    search = SearchConfig(repeats=2, objectives=[{"metric": "stats/js", "mode": "min"}])
    best = _best(rows, search)
    assert best["trials"] == ["b0", "b1"] and best["seeds"] == 2
    partial = _best(rows[:2], search)
    assert partial["trials"] == ["a0"] and partial["seeds"] == 2
    text = summary(SweepResult("s", Path("."), rows[:2], partial, None, None, None, 0.0), "stats/js")
    assert "trial a0, 1 of 2 seeds" in text


def test_with_repeats_a_seed_that_finished_without_a_value_does_not_let_its_point_win_on_the_other():
    """a1 finished but has no objective value (NaN): a's mean was a0's alone (0.10), and it
    beat b, whose both seeds have values (0.15), under "2 seeds"."""
    from sar_ray.config import SearchConfig
    from sar_ray.sweep import _best

    rows = [_row("a0", 0.10, 0, {"train.lr": 1e-3}), _row("a1", float("nan"), 1, {"train.lr": 1e-3}),
            _row("b0", 0.15, 0, {"train.lr": 1e-4}), _row("b1", 0.15, 1, {"train.lr": 1e-4})]
    search = SearchConfig(repeats=2, objectives=[{"metric": "stats/js", "mode": "min"}])
    assert _best(rows, search)["trials"] == ["b0", "b1"]
    alone = _best(rows[:2], search)
    assert alone["trials"] == ["a0"] and alone["seeds"] == 2 and alone["metrics"]["stats/js"] == pytest.approx(0.10)


def test_the_sweeps_best_is_the_reports_best_when_a_sampler_suggested_a_point_twice():
    """Optuna may suggest one point twice: with repeats 2 that is two rows of 2 seeds in the
    report (replicas are told apart by seed). The sweep's best pooled all four trials into one
    point of "4 seeds" (mean 0.21, behind b's 0.20) and named another best than the report."""
    from sar_ray.config import ObjectiveConfig, SearchConfig
    from sar_ray.report import TrialRow, best_per_strategy, group_points
    from sar_ray.sweep import _best

    p = {"train.lr": 1e-3}
    rows = [_row("p0", 0.10, 0, p), _row("p1", 0.12, 1, p), _row("q0", 0.30, 0, p), _row("q1", 0.32, 1, p),
            _row("b0", 0.19, 0, {"train.lr": 1e-4}), _row("b1", 0.21, 1, {"train.lr": 1e-4})]
    search = SearchConfig(repeats=2, objectives=[{"metric": "stats/js", "mode": "min"}])
    best = _best(rows, search)
    assert best["trials"] == ["p0", "p1"] and best["seeds"] == 2
    assert best["metrics"]["stats/js"] == pytest.approx(0.11)
    report_rows = [TrialRow(r["trial_id"], r["trial_id"], r["strategy"], "FINISHED", {}, r["metrics"],
                            trial_id=r["trial_id"], point=r["params"], seed=r["seed"]) for r in rows]
    top = best_per_strategy(group_points(report_rows), ObjectiveConfig(metric="stats/js", mode="min"))[0]
    assert [m.trial_id for m in top.repeats] == best["trials"]


def test_the_comparison_lists_trials_best_first_for_an_objective_to_maximise():
    from sar_ray.sweep import SweepResult, comparison_lines

    anchors = {"base": {"strategy": "base (untuned)", "metrics": {"clip/score": 0.1}},
               "real": {"strategy": "real (held out)", "metrics": {"clip/score": 0.9}}}
    r = SweepResult("s", Path("."), [_row("lo", 0.2), _row("hi", 0.8)], None, None, None, None, 0.0,
                    anchors=anchors, realism_metric="stats/js")
    for t in r.trials:
        t["metrics"] = {"clip/score": t["metrics"]["stats/js"]}
    lines = comparison_lines(r, "clip/score", "max")
    assert [line.split()[1] for line in lines if " lo " in line or " hi " in line] == ["hi", "lo"]


def test_a_trial_whose_objective_is_nan_is_listed_last_not_among_the_best():
    """A NaN objective made Python's sort leave the rows in any order: [0.3, nan, 0.1, 0.2]
    printed as given, so the first row under `anchors` was not the best trial."""
    from sar_ray.sweep import SweepResult, comparison_lines

    anchors = {"base": {"strategy": "base (untuned)", "metrics": {"stats/js": 0.5}},
               "real": {"strategy": "real (held out)", "metrics": {"stats/js": 0.0}}}
    trials = [_row(name, v) for name, v in (("a", 0.3), ("n", float("nan")), ("b", 0.1), ("c", 0.2))]
    r = SweepResult("s", Path("."), trials, None, None, None, None, 0.0, anchors=anchors, realism_metric="stats/js")
    lines = comparison_lines(r, "stats/js", "min")
    names = {t["trial_id"] for t in trials}
    assert [line.split()[1] for line in lines if len(line.split()) > 1 and line.split()[1] in names] == ["b", "c", "a", "n"]


def test_the_summary_names_strategies_as_the_report_does():
    """The summary printed the slug with ranks (`unet-lora8_...`), report.md the combination."""
    from sar_ray.sweep import SweepResult, summary

    anchors = {"base": {"strategy": "base (untuned)", "metrics": {"stats/js": 0.9}},
               "real": {"strategy": "real (held out)", "metrics": {"stats/js": 0.1}}}
    row = {**_row("t1", 0.2), "strategy": "unet-lora8_te-frozen_vae-frozen",
           "combination": "unet-lora_te-frozen_vae-frozen"}
    r = SweepResult("s", Path("."), [row], {**row, "trials": ["t1"], "seeds": 1}, None, None, None, 0.0,
                    anchors=anchors, realism_metric="stats/js")
    text = summary(r, "stats/js")
    assert "unet-lora_te-frozen_vae-frozen" in text and "lora8" not in text


def test_a_sweep_that_fails_before_its_trials_does_not_leave_its_parent_run_running(tmp_path, monkeypatch, ray_local):
    """The parent MLflow run starts before the anchors and the shared data prebuild; a failure
    there (here: the base model's sampling) ends it FAILED with the error, as a Tune failure does."""
    import sar_ray.sweep as sweep_mod

    def broken(*args, **kwargs):
        raise RuntimeError("the base model could not be sampled")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_mod, "anchor_rows", broken)
    s = study(tmp_path, {"strategy.unet.mode": {"grid": ["full"]}}, "search.algorithm=grid", "search.anchors=true",
              name="pf")
    with pytest.raises(RuntimeError, match="could not be sampled"):
        run_sweep(s, progress=False)
    client, exp = _client(tmp_path)
    (parent,) = client.search_runs([exp], "tags.`sar_ray.kind` = 'sweep'")
    assert parent.info.status == "FAILED"
    assert "the base model could not be sampled" in parent.data.tags["sar_ray.error"]


def test_a_parent_run_whose_first_logging_fails_is_not_left_running(tmp_path, monkeypatch, ray_local):
    """The sweep file and search params are logged to the parent run just after it starts; a
    failure there (a tracking server that went away, an artifact store it cannot write) left
    the parent RUNNING in the MLflow UI for ever."""
    from sar_ray.tracking import Tracker

    def broken(self, *args, **kwargs):
        raise OSError("artifact store not writable")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Tracker, "log_artifact", broken)
    s = study(tmp_path, {"strategy.unet.mode": {"grid": ["full"]}}, "search.algorithm=grid", name="pl")
    with pytest.raises(OSError, match="not writable"):
        run_sweep(s, progress=False)
    client, exp = _client(tmp_path)
    (parent,) = client.search_runs([exp], "tags.`sar_ray.kind` = 'sweep'")
    assert parent.info.status == "FAILED" and "not writable" in parent.data.tags["sar_ray.error"]


def test_the_sweep_checks_validation_shares_with_the_workers_its_points_use(tmp_path, monkeypatch, ray_local):
    """16 scenes at val_fraction 0.25 give 6 validation images: too few for the base trial's 8
    workers, enough for the 2 that every point of the search uses. The check once ran on the
    base and refused a sweep none of whose trials would fail."""
    import sar_ray.data.cache as cache_mod

    class Checked(Exception):
        pass

    def stop(*args, **kwargs):  # the check comes just before the prebuild: stop there
        raise Checked

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cache_mod, "prebuild", stop)
    s = study(tmp_path, {"scaling.num_workers": {"grid": [2]}}, "search.algorithm=grid", "scaling.num_workers=8",
              name="vw")
    with pytest.raises(Checked):
        run_sweep(s, progress=False)
    s = study(tmp_path, {"scaling.num_workers": {"grid": [2, 32]}}, "search.algorithm=grid", name="vw2")
    with pytest.raises(ConfigError, match="validation image.*scaling.num_workers 32"):
        run_sweep(s, progress=False)


def test_a_real_anchor_without_captions_keeps_clips_image_distances(tmp_path, ray_local):
    """A search.holdout folder of plain images has no captions. The real anchor used to drop
    the whole clip family, so a clip/fd objective's realism had no held-out end (blank cells);
    it now gets clip/fd and clip/kid (image distances need no prompt) and says what it left out."""
    from types import SimpleNamespace

    import numpy as np

    from sar_ray.data.io import write_amplitude_png
    from sar_ray.data.synth import synthetic_path
    from sar_ray.metrics.clip import build_clip, save_clip
    from sar_ray.sweep import anchor_rows

    clip_dir = save_clip(build_clip("tiny"), tmp_path / "clip", "tiny")
    s = study(tmp_path, {}, "eval.metrics=[stats,clip]", f"eval.clip={clip_dir}", "sample.seeds=[0,1]",
              "eval.bootstrap=0", name="ac")
    plain = tmp_path / "plain"
    plain.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        write_amplitude_png(plain / f"{i}.png", rng.rayleigh(0.2, (32, 32)).clip(0, 1))
    splits = SimpleNamespace(holdout=plain, reference=synthetic_path(s.data.synthetic))
    rows = anchor_rows(s.trial(), splits, tmp_path / "anchors")
    real, base = rows["real"], rows["base"]
    assert {"clip/fd", "clip/kid"} <= set(real["metrics"]) and "clip/score" not in real["metrics"]
    assert any("clip/score and clip/retrieval_top1 not computed" in w for w in real["warnings"])
    assert {"clip/fd", "clip/score"} <= set(base["metrics"])  # the untuned model's samples have prompts


@pytest.mark.slow
def test_a_sweep_on_shards_scores_against_the_member_it_trains_on(tmp_path, monkeypatch, ray_local, shards):
    """A study on WebDataset shards is scored against data.image_column, as it trains. Both
    sweep calls of evaluate left the members out, so the reference was read from the first
    `.npy` member: a SARLO-80 study trained on `sar.png` was scored against |s| of `sar.npy`.
    Here the two members differ in size, which metrics.json records (the reference's)."""
    import io
    import numpy as np

    samples = {}
    for i in range(16):
        key = f"{i:04d}"
        member = shards.sample(key, (32, 32))
        npy = io.BytesIO()
        np.save(npy, shards.slc(key, (40, 40)))
        samples[key] = {**member, "sar.npy": npy.getvalue()}
    tar = shards.write_shard(tmp_path / "wds" / "shard-000000.tar", samples)
    monkeypatch.chdir(tmp_path)
    s = study(tmp_path, {"train.lr": {"grid": [1e-4]}}, f"data.path={tar}", "data.image_column=sar.png",
              "data.text_column=caption.MID", "search.algorithm=grid", "search.scheduler.type=none",
              "search.anchors=true", "eval.metrics=[stats]", "eval.bootstrap=0", name="wds")
    r = run_sweep(s, progress=False)
    (trial,) = r.trials
    assert trial["status"] == "DONE", trial.get("error")
    for scored in (r.folder / "trials" / trial["trial_id"] / "metrics.json", r.folder / "anchors" / "base" / "metrics.json"):
        doc = json.loads(scored.read_text())
        assert doc["summary"]["size"] == [32, 32], scored  # sar.png's, not sar.npy's 40 x 40
        assert doc["n_reference"] == 16
