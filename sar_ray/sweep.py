"""Sweeps: Ray Tune over Ray Train trials, Optuna / grid / random search, ASHA, MLflow.

The only module that imports `ray.tune`. A Tune trial is a function (`_trial_driver`) that
resolves the study's base trial with the sampled parameters and calls `trial.run_trial`, the
same path `sar-ray trial` takes, with Tune's report callback; then it scores the trial's
samples with `evaluate.score` and reports the final metrics.

Layout of a sweep (`runs/<name>/` unless `out` is set):
    tune/<name>/        Ray Tune experiment state (what --resume restores)
    trials/<trial id>/  one trial folder each (weights, samples, checkpoints, train_log.jsonl)
    splits/             the reference and held-out sets scored against (sar_ray.data.splits)
    anchors/base|real/  the anchor rows: untuned model's samples, scores.json, metrics.json
    report/             the comparison report
    mlflow_run.json     the parent MLflow run (a resumed sweep logs to the same one)
    asha_rungs.json     ASHA's rung values (Tune does not save them; --resume reads them back)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from . import config as config_mod
from .config import ConfigError, ParamSpec, SearchConfig, StudyConfig, TrialConfig
from .report import ANCHOR_WORDS
from .trial import failure_message

# What the driver-side trial table uses after Tune unpickles it (restore): console, tracker.
_DRIVER: dict[str, Any] = {}

DATA_CPUS = 1  # CPUs a sweep leaves to Ray Data
# Set in a trial's last report when it trained, sampled and scored to the end. (Tune's own
# `done` is also true for trials its scheduler stopped.)
FINISHED_KEY = "trial_finished"

# Keys that only mean something for a LoRA component: sampled only where it is LoRA.
LORA_ONLY = ("rank", "alpha", "dropout", "target_modules")


@dataclass
class SweepResult:
    name: str
    folder: Path
    trials: list[dict[str, Any]]  # one row per trial: params, status, metrics
    best: dict[str, Any] | None
    parent_run_id: str | None
    run_url: str | None
    report: Path | None
    wall_s: float
    anchors: dict[str, dict[str, Any]] = field(default_factory=dict)  # "base" / "real": strategy, metrics
    realism_metric: str | None = None  # the metric the rows' `realism` is measured on
    splits_note: str | None = None  # where the reference and held-out sets came from


# --------------------------------------------------------------------------------------------
# search space
# --------------------------------------------------------------------------------------------


def _condition(key: str) -> str | None:
    """`strategy.unet.rank` -> `strategy.unet.mode` (the key deciding whether it is active)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "strategy" and parts[2] in LORA_ONLY:
        return f"strategy.{parts[1]}.mode"
    return None


def _ordered(space: dict[str, ParamSpec]) -> list[str]:
    """Mode keys before the keys that depend on them."""
    return sorted(space, key=lambda k: (_condition(k) is not None, list(space).index(k)))


def _active(key: str, params: dict[str, Any], base: TrialConfig) -> bool:
    cond = _condition(key)
    if cond is None:
        return True
    mode = params.get(cond)
    if mode is None:
        node: Any = base
        for part in cond.split("."):
            node = getattr(node, part)
        mode = node
    return mode == "lora"


def _expand(axes: dict[str, list[Any]], order: list[str], base: TrialConfig) -> list[dict[str, Any]]:
    """Every combination of `axes` (key -> values), a conditional key only where active."""
    points: list[dict[str, Any]] = [{}]
    for key in order:
        nxt = []
        for p in points:
            if _active(key, p, base):
                nxt.extend({**p, key: v} for v in axes[key])
            else:
                nxt.append(p)
        points = nxt
    return points


def grid_points(search: SearchConfig, base: TrialConfig, source: str = "search.space") -> list[dict[str, Any]]:
    """Every combination of the grid/choice axes, conditional keys expanded only where active
    (no duplicate trials that differ only in the rank of a frozen component). Each point must
    make a valid trial: only the "nothing would train" point of a full grid over modes is left
    out; any other invalid point (a typo inside a grid value, say) is refused with its key."""
    order = _ordered(search.space)
    points = _expand({k: search.space[k].values for k in order}, order, base)
    return [p for p in points if _checked(base, p, source)]


def diagonal_points(search: SearchConfig, base: TrialConfig) -> list[dict[str, Any]]:
    """A few points where listing the whole grid is too many: each axis steps through its
    values, one per point in which it is active, so every value of every axis that can be
    active is tried (a LoRA rank cycles only over the points where its component is LoRA);
    points that make no valid trial are left out. Grid axes only, as `grid_points`."""
    order = _ordered(search.space)
    used = dict.fromkeys(order, 0)
    points: list[dict[str, Any]] = []
    for _ in range(max(len(search.space[k].values) for k in order) * len(order)):
        if all(used[k] >= len(search.space[k].values) for k in order):
            break
        point: dict[str, Any] = {}
        for key in order:
            if _active(key, point, base):
                values = search.space[key].values
                point[key] = values[used[key] % len(values)]
                used[key] += 1
        if point_error(base, point) is None:
            points.append(point)
    return points


NOTHING_TRAINS = "nothing would train"


def _point_trial(base: TrialConfig, params: dict[str, Any]) -> TrialConfig:
    """The base trial with `params` (dotted keys); pydantic's ValidationError when invalid."""
    raw = base.model_dump()
    for key, value in params.items():
        config_mod._set_path(raw, key.split("."), value)
    return TrialConfig.model_validate(raw)


def point_error(base: TrialConfig, params: dict[str, Any]) -> str | None:
    """None when the base trial with `params` is a valid trial config, else what is wrong
    (field paths as in the study file)."""
    try:
        _point_trial(base, params)
        return None
    except ValidationError as e:
        return config_mod.format_validation_error(e, "", TrialConfig).removeprefix(": ").replace("\n: ", "; ")


def _checked(base: TrialConfig, params: dict[str, Any], source: str) -> bool:
    """True: a valid trial; False: the point trains nothing (left out); else ConfigError."""
    error = point_error(base, params)
    if error is None:
        return True
    if NOTHING_TRAINS in error:
        return False
    raise ConfigError(f"{source}: the point {json.dumps(params, default=str)} is not a valid trial: {error}")


def _search_points(search: SearchConfig, base: TrialConfig) -> list[dict[str, Any]]:
    """The points `check_search` builds: grid, every grid point; Optuna / random, every
    combination of the categorical axes with each range at its low and high end."""
    order = _ordered(search.space)
    if search.algorithm == "grid":
        axes = {k: search.space[k].values for k in order}
    else:
        axes = {k: (search.space[k].values or list(search.space[k].loguniform or search.space[k].uniform))
                for k in order}
    return _expand(axes, order, base)


def check_search(study: StudyConfig, source: str = "search.space") -> tuple[int, int]:
    """Build a full trial config from every point the search can produce; returns (trials,
    points left out because nothing would train). Grid: every grid point (x num_samples).
    Optuna / random: every combination of the categorical axes with each range at its low and
    high end, so a bad value anywhere is refused before a trial starts; num_samples points.
    Trials = points x search.repeats (seed replicas); a grid with search.points runs those."""
    search, base = study.search, study.trial()
    if search is None:
        return 1, 0
    points = _search_points(search, base)
    kept = [p for p in points if _checked(base, p, source)]
    if not kept:
        raise ConfigError(f"{source}: no point of the search space makes a trial that trains something")
    # A grid with search.points runs exactly those points (each checked to be a grid point).
    grid_size = len(search.points) if search.points else len(kept)
    points_run = grid_size * search.num_samples if search.algorithm == "grid" else search.num_samples
    return points_run * search.repeats, len(points) - len(kept)


def search_configs(study: StudyConfig) -> list[TrialConfig]:
    """The trial configs of the points `check_search` checks (the base trial without a search):
    what a sweep asks of its shared caches (every strategy its trials can take)."""
    base = study.trial()
    if study.search is None:
        return [base]
    out = []
    for p in _search_points(study.search, base):
        try:
            out.append(_point_trial(base, p))
        except ValidationError:
            pass  # a point that trains nothing (check_search refused any other)
    return out


class _DefineByRun:
    """Optuna define-by-run space: conditional parameters are suggested only when active.
    A class rather than a closure: Tune pickles the searcher into its experiment state."""

    def __init__(self, search: SearchConfig, base: TrialConfig):
        self.search_raw, self.base_raw = search.model_dump(mode="json"), base.model_dump(mode="json")

    def __call__(self, trial) -> dict[str, Any]:
        search, base = SearchConfig.model_validate(self.search_raw), TrialConfig.model_validate(self.base_raw)
        params: dict[str, Any] = {}
        for key in _ordered(search.space):
            spec = search.space[key]
            if not _active(key, params, base):
                continue
            if spec.values is not None:
                params[key] = trial.suggest_categorical(key, spec.values)
            elif spec.loguniform is not None:
                params[key] = trial.suggest_float(key, *spec.loguniform, log=True)
            else:
                params[key] = trial.suggest_float(key, *spec.uniform)
        return {}  # Tune reads the suggested values from the trial itself


def _define_by_run(search: SearchConfig, base: TrialConfig) -> _DefineByRun:
    return _DefineByRun(search, base)


# The seed replica index of a trial (search.repeats): grid trials carry it in their param
# space, Optuna/random ones get Tune's Repeater index.
REPEAT_KEY = "repeat"


def search_point(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the sampled point, its seed replica k) from a Tune trial config."""
    from ray.tune.search.repeater import TRIAL_INDEX

    params = dict(config.get("params", config))
    repeat = int(config.get(REPEAT_KEY, params.pop(TRIAL_INDEX, 0)) or 0)
    params.pop(REPEAT_KEY, None)
    return {k: v for k, v in params.items() if not k.startswith("_")}, repeat


def _seeded(study: StudyConfig, params: dict[str, Any], repeat: int) -> dict[str, Any]:
    """Replica k of a point trains with train.seed + k (search.repeats)."""
    return {**params, "train.seed": study.train.seed + repeat} if repeat else params


def trial_config(study: StudyConfig, params: dict[str, Any], out: Path, name: str) -> TrialConfig:
    """The study's base trial with sampled `params` (dotted keys), re-validated."""
    updates = {k: v for k, v in params.items() if not k.startswith("_")}
    try:
        return study.trial(**updates, out=str(out), name=name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError: name the params
        raise ConfigError(f"search point {updates} gives an invalid trial: {e}") from None


# --------------------------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------------------------


# A custom resource that stable nodes (the head / CPU node type of cluster.yaml) advertise.
TRIAL_DRIVER_RESOURCE = "trial_driver"


def trial_resources(cfg: TrialConfig, cluster: dict[str, float] | None = None) -> dict[str, float]:
    """What the trial function itself reserves. In local mode it trains in its own process, so
    it takes the worker's CPU (and GPU); otherwise the Ray Train workers ask for theirs and
    the driver needs only a sliver, on a stable node where the cluster advertises
    `trial_driver`: Train V2 pins a trial's controller to its driver's node, so a driver on a
    spot GPU node would lose the trial when that node is preempted (Ray's interop guidance)."""
    s = cfg.scaling
    if s.num_workers == 0:
        res = {"CPU": s.cpus_per_worker}
        if s.use_gpu:
            res["GPU"] = 1
        return res
    res = {"CPU": 0.1}
    if (cluster or {}).get(TRIAL_DRIVER_RESOURCE):
        res[TRIAL_DRIVER_RESOURCE] = 0.01
    return res


def autoscaler_limits() -> dict[str, Any] | None:
    """What the cluster's autoscaler may bring up, from the node types it reported to the GCS
    (the config Ray Data's own autoscaling reads; Ray has no public call for it): see
    `limits_from_config`. None on a local Ray or a cluster without an autoscaler."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private call: without it, the resources up now decide
        return None
    return limits_from_config(config)


def limits_from_config(config) -> dict[str, Any] | None:
    """{"max": {resource: most the cluster can have}, "autoscales": bool} from an autoscaler
    ClusterConfig (node types with their resources and min/max worker counts): per resource the
    sum over node types of max count x per-node amount (inf for a type without a maximum),
    capped by the cluster-wide max_resources. `autoscales`: some node type can grow (Ray's
    own test: max_count -1 or above min_count)."""
    if config is None or not config.node_group_configs:
        return None
    most: dict[str, float] = {}
    for group in config.node_group_configs:
        if group.max_count == 0:
            continue
        for key, amount in group.resources.items():
            most[key] = most.get(key, 0) + (math.inf if group.max_count < 0 else group.max_count * amount)
    for key, cap in config.max_resources.items():
        if key in most:
            most[key] = min(most[key], cap)
    autoscales = any(g.max_count < 0 or g.max_count > g.min_count
                     for g in config.node_group_configs if g.max_count != 0 and g.resources)
    return {"max": most, "autoscales": autoscales}


def concurrent_trials(cfg: TrialConfig, search: SearchConfig, cluster: dict[str, float],
                      limits: dict[str, Any] | None = None) -> int | None:
    """How many trials the cluster fits at once (unless search.max_concurrent_trials says):
    the resources up now, or on an autoscaling cluster (`limits`, see `autoscaler_limits`) the
    most its node types' maximum worker counts can bring up, so that the limit neither freezes
    at the nodes up when the sweep starts nor is missing while none is. One CPU stays free for
    Ray Data (data checks, evaluation): trials that hold every CPU would wait for ever on the
    tasks they start."""
    if search.max_concurrent_trials:
        return search.max_concurrent_trials
    s = cfg.scaling
    most = (limits or {}).get("max") or {}

    def capacity(key: str) -> float:
        """The autoscaler's maximum where it has a finite one, else what is up now."""
        up = cluster.get(key, 0)
        return up if math.isinf(most.get(key, 0)) else max(up, most.get(key, 0))

    workers = max(s.num_workers, 1)
    cpu_per_trial = trial_resources(cfg)["CPU"] + (s.num_workers * s.cpus_per_worker)
    fits = [math.floor(((capacity("CPU") or 1) - DATA_CPUS) / cpu_per_trial)]
    if s.use_gpu:
        gpus = capacity("GPU")
        if not gpus:
            # An autoscaling cluster starts without GPU nodes. Without a limit Tune would start
            # every trial driver at once (each with a RUNNING MLflow run and a pending placement
            # group) and TPE would suggest every point before any result.
            why = ("its autoscaler sets no maximum GPU worker count" if math.isinf(most.get("GPU", 0))
                   else "no autoscaler reports a GPU node type (an autoscaling cluster starts with none)")
            raise ConfigError(
                f"scaling.use_gpu: the cluster has no GPU node up yet and {why}; set search.max_concurrent_trials to "
                "what its GPU nodes will fit (max GPU workers x GPUs per node / GPUs per trial)")
        fits.append(math.floor(gpus / (workers * (s.gpus_per_worker if s.num_workers else 1))))
    return max(1, min(fits))


# --------------------------------------------------------------------------------------------
# the Tune trial
# --------------------------------------------------------------------------------------------


def _trial_driver(config: dict[str, Any], *, study_raw: dict, folder: str, tracking: dict | None,
                  reference: str | None, data=None) -> None:
    """One Tune trial: train through `run_trial` (as `sar-ray trial` does), score, report."""
    import ray.tune as tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .trial import run_trial

    study = StudyConfig.model_validate(study_raw)
    params, repeat = search_point(config)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(study, _seeded(study, params, repeat), Path(folder) / "trials" / trial_id, study.name)

    final_path = cfg.out_dir / "final.json"
    if final_path.is_file():
        # Finished before the driver died, but Tune had not recorded it yet: report, don't rerun.
        tune.report(json.loads(final_path.read_text()))
        return

    tracker = None
    if tracking is not None:
        from .tracking import Tracker

        tracker = Tracker(tracking["uri"], tracking["experiment"])
    # Worker groups report through Train's callback; local mode runs the loop right here, with
    # no Train callbacks, and reports to Tune itself (train.session_for).
    local = cfg.scaling.num_workers == 0
    result = run_trial(cfg, progress=False, callbacks=None if local else [TuneReportCallback()], tracker=tracker,
                       parent_run_id=tracking["parent_run_id"] if tracking else None,
                       tags={"sar_ray.trial_id": trial_id, "sar_ray.params": json.dumps(params, sort_keys=True),
                             "sar_ray.repeat": str(repeat), "sar_ray.seed": str(cfg.train.seed)},
                       data=data,
                       # Unique per sweep and trial (Ray's Train/Tune interop example): Train V2
                       # restores from (storage_path, name), so trials must never share one.
                       run_name=f"{study.name}-{trial_id}", report_to="tune" if local else "train",
                       check_memory=False)  # run_sweep checked every point before the first trial

    final: dict[str, Any] = {"step": result.step, "loss": result.loss, "val_loss": result.val_loss, FINISHED_KEY: True,
                             **_last_quick(cfg.out_dir), **{f"cost/{k}": v for k, v in result.cost().items()}}
    if study.search is not None and study.search.evaluate and reference:
        from .evaluate import evaluate

        # Real images are compared in the space the model learned: the training normalisation.
        # metrics.json keeps what the scores alone would lose: intervals, normalisation, warnings.
        scored = evaluate(result.samples, reference, cfg.eval.model_copy(update={"normalization": cfg.data.normalization}),
                          out=cfg.out_dir / "metrics.json", progress=False, reference_columns=reference_columns(cfg.data),
                          skip_unreadable_reference=cfg.data.on_corrupt == "skip")
        scores = scored.flat()
        final.update(scores)
        if tracker is not None:
            tracker.log_metrics(result.run_id, [(k, v, result.step) for k, v in scores.items()
                                                if v is not None and math.isfinite(v)])
            tracker.log_artifact(result.run_id, cfg.out_dir / "metrics.json")
            if scored.warnings:
                tracker.set_tags(result.run_id, {"sar_ray.eval_warnings": " | ".join(scored.warnings)[:5000]})
    # No None values: ASHA multiplies the metric it reads (a trial without validation images
    # reported val_loss None and the TypeError ended the whole sweep); absent, it is skipped.
    final = {k: v for k, v in final.items() if v is not None}
    final_path.write_text(json.dumps(final))
    tune.report(final)


def _last_quick(out: Path) -> dict[str, float]:
    """The trial's newest quick/<metric> values (its last sampling step): the final report
    carries them like every report before it, so a scheduler ranking on one never reads a
    result without it."""
    from .trial import read_log

    last: dict[str, float] = {}
    path = out / "train_log.jsonl"
    for rec in read_log(path) if path.is_file() else []:
        last.update({k: v for k, v in rec.items() if k.startswith("quick/")})
    return last


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------


def _tune_pieces(study: StudyConfig, base: TrialConfig):
    """(param_space, search_alg, scheduler, num_samples) for the Tuner."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    search = study.search
    objective = search.objectives[0]
    scheduler = None
    if search.scheduler.type == "asha":
        sc = search.scheduler
        # stop_last_trials=False: a trial reaching max_t must go on to save, sample and score;
        # ASHA would otherwise stop it at its last report.
        max_t = config_mod.asha_max_t(base.train.max_steps)
        scheduler = ASHAScheduler(time_attr="step", metric=sc.metric, mode=sc.mode, max_t=max_t,
                                  grace_period=min(sc.grace_period, max_t),
                                  reduction_factor=sc.reduction_factor, stop_last_trials=False)
    if search.algorithm == "grid":
        points = grid_points(search, base)
        if search.points is not None:
            points = _fixed_grid(search.points, points)
        space = {"params": tune.grid_search(points)}
        if search.repeats > 1:  # every point x every replica: a cartesian grid
            space[REPEAT_KEY] = tune.grid_search(list(range(search.repeats)))
        return space, None, scheduler, search.num_samples
    import optuna

    # constant_liar: trials running in parallel count as (pessimistic) results, so TPE does
    # not suggest the same point to every free slot before the first trial reports.
    sampler = (optuna.samplers.TPESampler(seed=search.seed, constant_liar=True) if search.algorithm == "optuna"
               else optuna.samplers.RandomSampler(seed=search.seed))
    metrics = [o.metric for o in search.objectives]
    modes = [o.mode for o in search.objectives]
    # search.points are enqueued in the Optuna study: its first trials, then the sampler's.
    alg = _FinalMetricOptuna(space=_define_by_run(search, base), sampler=sampler,
                       metric=metrics if len(metrics) > 1 else objective.metric,
                       mode=modes if len(modes) > 1 else objective.mode,
                       points_to_evaluate=[dict(p) for p in search.points] if search.points else None)
    if search.repeats > 1:
        from ray.tune.search import Repeater

        # Each suggestion runs `repeats` times (index -> train.seed + k); TPE sees one result
        # per point, the mean over its replicas.
        return {}, Repeater(alg, repeat=search.repeats), scheduler, search.num_samples * search.repeats
    return {}, alg, scheduler, search.num_samples


def _fixed_grid(fixed: list[dict[str, Any]], grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """search.points of a grid study, each checked to be one of its grid points."""
    for i, point in enumerate(fixed):
        if point not in grid:
            raise ConfigError(f"search.points[{i}]: {point} is not a point of the grid (a LoRA-only key where the "
                              f"component is not LoRA, a missing axis, or a combination that cannot train)")
    return [dict(p) for p in fixed]


class _FinalMetricOptuna(OptunaSearch):
    """Evaluation metrics (stats/js, clip/score, ...) exist only in a trial's last report;
    intermediate reports without the objective are not passed to Optuna."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)


def sweep_folder(study: StudyConfig) -> Path:
    return (Path(study.out) if study.out else Path("runs") / study.name).resolve()


def run_sweep(study: StudyConfig, *, resume: bool = False, fresh: bool = False, console=None,
              progress: bool = True) -> SweepResult:
    """Run (or with `resume`, continue) the study's sweep; return every trial and the best.
    `fresh`: delete an earlier sweep of this name first (its folder's Tune state and trials,
    and its Train runs under `scaling.storage_path`) and start over."""
    import ray
    import ray.tune as tune

    from .train import connect_ray

    if study.search is None:
        raise ConfigError("this study file has no `search` section; run it with `sar-ray trial`, or add search.space")
    # Objectives such as stats/js arrive only in a trial's last report (after scoring); Tune's
    # strict check would refuse the intermediate ones that carry only the loss.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    check_search(study)  # every point a valid trial, before the parent run or any compute
    given = study
    study = absolute_paths(study)
    from .plan import check_memory

    check_memory(study)  # every point's lower bound against scaling.gpu_memory_gb, before any compute
    connect_ray(study.scaling.address)
    check_cluster_paths(given)
    started = time.time()
    base = study.trial()
    folder = sweep_folder(study)
    tune_root = folder / "tune"
    exp_dir = tune_root / study.name
    if fresh:
        _clear_sweep(folder, study)
        resume = False
    if resume and not tune.Tuner.can_restore(str(exp_dir)):
        # Nothing to continue: start it (a RayJob retry or a cron job runs one command).
        resume = False
    _check_same_study(folder, study, resume)
    if not resume and exp_dir.exists():
        raise ConfigError(f"{exp_dir} holds an earlier sweep: add --resume to continue it, or set out= / name= "
                          f"(or delete the folder) to start a new one")
    folder.mkdir(parents=True, exist_ok=True)
    # The reference and held-out sets, checked (an overlap is refused) before any run or compute.
    splits = _splits(study, base, folder)

    tracker, parent_run_id, tracking = None, None, None
    if base.tracking.enabled:
        from .tracking import Tracker, absolute_uri, default_uri, remember_run, remembered_run

        uri = absolute_uri(default_uri(base.tracking.uri))
        tracker = Tracker(uri, base.tracking.experiment)
        parent_run_id = tracker.start_run(
            f"sweep/{study.name}", tags={"sar_ray.kind": "sweep", "sar_ray.folder": str(folder)},
            resume_run_id=remembered_run(folder, uri),
        )
        try:  # the parent run exists from here: a failure must not leave it RUNNING
            remember_run(folder, uri, parent_run_id)
            (folder / "sweep.yaml").write_text(config_mod.dump_yaml(study))
            tracker.log_artifact(parent_run_id, folder / "sweep.yaml")
            tracker.log_params(parent_run_id, {
                "search.algorithm": study.search.algorithm, "search.num_samples": study.search.num_samples,
                # what `sar-ray report` ranks by when rebuilding this report
                "search.objectives": json.dumps([o.model_dump() for o in study.search.objectives]),
                "search.space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in study.search.space.items()})})
            if splits is not None:
                tracker.set_tags(parent_run_id, {"sar_ray.splits": splits.note[:5000]})
        except BaseException as e:
            _end_failed_parent(tracker, parent_run_id, e)
            raise
        tracking = {"uri": uri, "experiment": base.tracking.experiment, "parent_run_id": parent_run_id}

    # From here on the parent run exists: whatever fails (an anchor, the data prebuild, Tune,
    # the report) must not leave it RUNNING for ever.
    try:
        reference = splits.reference if splits is not None else None
        anchors: dict[str, dict[str, Any]] = {}
        if splits is not None and study.search.anchors:
            # Before the trials: the scale (untuned model, real held-out SAR) is known from the start,
            # and a resumed sweep finds it logged instead of computing it again.
            anchors = anchor_rows(base, splits, folder / ANCHOR_DIR, tracker, parent_run_id)
        study_raw = study.model_dump(mode="json")
        shared = None
        # Shared datasets are built with the base train.seed (their order): not for seed replicas.
        if study.search.repeats == 1 and not any(k.startswith(("data.", "train.seed")) or k in ("data", "train")
                                                 for k in study.search.space):
            from .data import build_datasets
            from .data.cache import prebuild

            # Every trial reads the same images: check and prepare them once, here, while the
            # cluster's CPUs are free, instead of once per trial (and, with data.cache: auto, encode
            # them once: the latent cache that trials with a frozen VAE read, and the text cache that
            # trials with frozen text encoders and no learned token read).
            built = build_datasets(base.data, base.train.seed)
            from .trial import check_validation_shares

            points = search_configs(study)
            for point in points:  # once, here, not in every trial (scaling.num_workers may be an axis)
                check_validation_shares(point, built.n_train, built.n_val)
            shared = prebuild(base, built, points)
        trainable = tune.with_resources(
            tune.with_parameters(_trial_driver, study_raw=study_raw, folder=str(folder), tracking=tracking,
                                 reference=reference, data=shared),
            trial_resources(base, ray.cluster_resources()),
        )
        _DRIVER.update(console=console if progress else None, tracker=tracker)
        table = _TrialTable(study, _DRIVER["console"], tracker)
        run_config = tune.RunConfig(
            name=study.name,
            storage_path=str(tune_root),
            failure_config=tune.FailureConfig(max_failures=study.search.max_failures),
            callbacks=[table, _FailureBudget(study.search.max_failures)],
            verbose=0,
        )
        objective = study.search.objectives[0]
        if resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
            _resume_with(tuner, run_config, folder / RUNGS_FILE)
        else:
            param_space, alg, scheduler, num_samples = _tune_pieces(study, base)
            (folder / RUNGS_FILE).unlink(missing_ok=True)  # an earlier sweep's (--fresh) must not be resumed into
            if scheduler is not None:
                run_config.callbacks.append(_RungKeeper(scheduler, folder / RUNGS_FILE))
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=alg,
                    scheduler=scheduler,
                    num_samples=num_samples,
                    max_concurrent_trials=concurrent_trials(base, study.search, ray.cluster_resources(),
                                                            autoscaler_limits()),
                    # Local mode: one process runs trial after trial, no re-import of torch/diffusers
                    # per trial (measured: 9 s -> 0.1 s between trials on 2 CPUs). With Train worker
                    # groups never: a trial that ASHA stops is still inside `trainer.fit()` in its
                    # actor; only ending that actor ends its Train controller and workers and frees
                    # their placement group (a reused actor hung the next trial).
                    reuse_actors=base.scaling.num_workers == 0,
                ),
                run_config=run_config,
            )
        table.start()
        try:
            grid = tuner.fit()
        finally:
            table.stop()

        rows = _rows(grid, study)
        best = _best(rows, study.search)
        from .report import realism_metric

        realism = realism_metric(objective, study.eval.metrics)
        for row in rows:
            row["realism"] = realism_of(row["metrics"].get(realism), anchors, realism)
        report_dir = None
        if tracker is not None:
            from .report import build_report

            report_dir = build_report(tracker, parent_run_id, folder / "report", objective=objective,
                                      objectives=study.search.objectives)
            if best is not None:
                tracker.set_tags(parent_run_id, {"sar_ray.best_trial": " ".join(best.get("trials", [best["trial_id"]])),
                                                 "sar_ray.best_strategy": _combination(best)})
                tracker.log_metrics(parent_run_id, [(f"best/{objective.metric}", best["metrics"].get(objective.metric), 0)])
            tracker.end_run(parent_run_id, "FINISHED")
        (folder / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
        return SweepResult(study.name, folder, rows, best, parent_run_id,
                           tracker.run_url(parent_run_id) if tracker else None, report_dir, time.time() - started,
                           anchors=anchors, realism_metric=realism, splits_note=splits.note if splits else None)
    except BaseException as e:
        _end_failed_parent(tracker, parent_run_id, e)
        raise


def _end_failed_parent(tracker, parent_run_id: str | None, e: BaseException) -> None:
    """Mark the sweep's parent run FAILED (KILLED on Ctrl-C) with the error as a tag, if it is
    still RUNNING; best effort: the error that got here is the one the user must see."""
    if tracker is None or parent_run_id is None:
        return
    try:
        if tracker.client.get_run(parent_run_id).info.status == "RUNNING":
            tracker.set_tags(parent_run_id, {"sar_ray.error": f"{type(e).__name__}: {e}"[:5000]})
            tracker.end_run(parent_run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
    except Exception:  # noqa: BLE001 - e.g. the tracking server went away too
        pass


def check_cluster_paths(study: StudyConfig, nodes: int | None = None, autoscales: bool | None = None) -> None:
    """On a cluster that has or may get several nodes (more than one alive, or an autoscaler
    allowed to add workers), refuse what resolves on one node only: a relative `out` (under
    `ray job submit`, a temporary working directory of the head) and a SQLite tracking store (a
    file only the driver's node sees; trials log from other nodes). Without `nodes`, the
    connected cluster is asked."""
    import ray

    from .tracking import default_uri

    if nodes is None:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if autoscales is None:
            autoscales = bool((autoscaler_limits() or {}).get("autoscales"))
    if nodes <= 1 and not autoscales:
        return
    where = f"a cluster of {nodes} nodes" if nodes > 1 else "an autoscaling cluster (it may add nodes)"
    if not study.out or not Path(study.out).is_absolute():
        raise ConfigError(f"out={study.out or '(default runs/' + study.name + ')'}: on {where} set "
                          f"an absolute path on storage every node mounts (e.g. out=/data/runs/{study.name})")
    uri = default_uri(study.tracking.uri)
    if uri.startswith("sqlite:"):
        raise ConfigError(f"tracking.uri={uri}: on {where} trials log from other nodes; use the "
                          f"MLflow server (e.g. http://HEAD_PRIVATE_IP:5000, which cluster.yaml starts)")


STUDY_FILE = "study.json"
RUNGS_FILE = "asha_rungs.json"  # ASHA's recorded rung values, which Tune does not save (see _RungKeeper)


def _clear_sweep(folder: Path, study: StudyConfig) -> None:
    import shutil

    from .trial import clear_run_storage, storage_filesystem

    for name in ("tune", "trials", "report", ANCHOR_DIR, "splits", STUDY_FILE, "mlflow_run.json", "trials.json"):
        p = folder / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    storage = study.scaling.storage_path
    if storage:
        import pyarrow.fs as pafs

        fs, root = storage_filesystem(storage)
        try:
            runs = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except OSError as e:
            raise ConfigError(f"scaling.storage_path={storage!r}: cannot list it for --fresh ({e})") from None
        for info in runs:
            if info.type == pafs.FileType.Directory and info.base_name.startswith(f"{study.name}-"):
                clear_run_storage(storage, info.base_name)


def study_fingerprint(study: StudyConfig) -> str:
    """What makes two runs the same study: the base trial's fingerprint and the search."""
    import hashlib

    search = study.search.model_dump(mode="json", exclude={"max_failures", "max_concurrent_trials"})
    doc = json.dumps({"base": study.trial().fingerprint(), "search": search}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:12]


def _resume_with(tuner, run_config, rungs_file: Path) -> None:
    """Give a restored Tuner this driver's callbacks (the live table, `_FailureBudget`), and its
    ASHA the rungs the first run recorded. Tune restores the run config and scheduler it
    pickled when the sweep first started: its `_TrialTable` came back as a copy that no live
    display shows (the table stayed empty), and ASHA's rungs were empty."""
    local = getattr(tuner, "_local_tuner", None)  # Ray 2.60: no public way to set them on restore
    if local is None:  # Ray Client: Tune runs on the cluster, with the state it saved
        import logging

        logging.getLogger(__name__).warning("--resume over Ray Client: the sweep keeps the callbacks and "
                                            "search.max_failures it started with, and ASHA starts afresh")
        return
    restored = local.get_run_config()
    restored.callbacks = list(run_config.callbacks)
    scheduler = local._tune_config.scheduler
    if _asha(scheduler) is not None:
        load_rungs(scheduler, rungs_file)
        restored.callbacks.append(_RungKeeper(scheduler, rungs_file))


def _asha(scheduler):
    """sar-ray's ASHA's one bracket, or None for another scheduler."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    if not isinstance(scheduler, AsyncHyperBandScheduler):
        return None
    (bracket,) = scheduler._brackets  # _tune_pieces builds ASHA with one bracket
    return bracket


def load_rungs(scheduler, path: Path) -> int:
    """Put the rung values `_RungKeeper` saved back into a restored ASHA; how many it put.

    Tune saves no scheduler state with the experiment, so a resumed ASHA judged the first trial
    to reach each rung against no one (it always went on) and never counted the finished ones.
    A resumed trial that reports at a rung it passed before the kill is not judged again (ASHA
    keeps a trial's first value per rung). No file (a sweep started before sar-ray kept it, or
    one killed before its first rung): ASHA starts with empty rungs, as before."""
    bracket = _asha(scheduler)
    try:
        saved = {float(m): rec for m, rec in json.loads(path.read_text())["rungs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    n = 0
    for milestone, recorded in bracket._rungs:
        for trial_id, value in (saved.get(float(milestone)) or {}).items():
            if trial_id not in recorded:
                recorded[trial_id] = float(value)
                n += 1
    return n


class _RungKeeper(Callback):
    """Saves ASHA's rungs (milestone -> {trial id: the value it was judged on}) to the sweep
    folder whenever they change, for `load_rungs` on `--resume`. Written before Tune acts on
    the next result, so a kill loses at most the newest value."""

    def __init__(self, scheduler, path: Path):
        self.bracket, self.path, self._saved = _asha(scheduler), Path(path), -1  # found once, not per step

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a restored copy is replaced by this driver's (_resume_with)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.bracket, self.path, self._saved = None, None, -1

    def _save(self) -> None:
        bracket = self.bracket
        if bracket is None:
            return
        n = sum(len(r) for _, r in bracket._rungs)
        if n == self._saved:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rungs": [[m, dict(r)] for m, r in bracket._rungs]}))
        tmp.replace(self.path)  # atomic: a kill mid-write leaves the previous file
        self._saved = n

    def on_step_begin(self, iteration, trials, **info):
        self._save()

    def on_experiment_end(self, trials, **info):
        self._save()


def _check_same_study(folder: Path, study: StudyConfig, resume: bool) -> None:
    """`--resume` must continue this study, not one made by another file that used the folder."""
    path = folder / STUDY_FILE
    mine = study_fingerprint(study)
    if resume and path.is_file():
        theirs = json.loads(path.read_text()).get("fingerprint")
        if theirs != mine:
            raise ConfigError(f"--resume: {folder} holds a sweep of another study (fingerprint {theirs}, this file "
                              f"{mine}): resume it with its own file, or set out= / name= to start this one")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": study.name, "fingerprint": mine}))


def absolute_paths(study: StudyConfig) -> StudyConfig:
    """Tune runs each trial in its own folder, maybe on another node: resolve the study's
    relative paths (data, SAR-CLIP, a local model, the output) against the current directory."""

    def resolve(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    updates: dict = {"out": str(sweep_folder(study))}
    if study.data.path != "synthetic":
        updates["data"] = study.data.model_copy(update={"path": str(Path(study.data.path).resolve())})
    updates["model"] = study.model.model_copy(update={"pretrained": resolve(study.model.pretrained)})
    updates["eval"] = study.eval.model_copy(update={"clip": resolve(study.eval.clip)})
    return study.model_copy(update=updates)


def reference_columns(data) -> tuple | None:
    """The members a WebDataset reference is read with: the study's own (data.image_column,
    data.text_column) when it trains on shards, as `sar-ray evaluate --config` reads them. Without
    them a SARLO-80 study trained on `sar.png` was scored against `|s|` of `sar.npy` (the first
    `.npy` member). None for a folder or table source (a shard reference: its first `.npy`)."""
    from .data.webdataset import is_shards

    return (data.image_column, data.text_column) if is_shards(data.path) else None


def _splits(study: StudyConfig, base: TrialConfig, folder: Path):
    """The sweep's reference and held-out sets (sar_ray.data.splits), None without evaluation."""
    if study.search is None or not study.search.evaluate:
        return None
    from .data.splits import study_splits

    holdout = study.search.holdout if study.search.anchors else None
    if study.search.anchors or not study.search.reference:
        return study_splits(base.data, folder / "splits", len(base.sample.prompts) * len(base.sample.seeds),
                            reference=study.search.reference, holdout=holdout)
    from .data.splits import StudySplits

    return StudySplits(str(Path(study.search.reference).resolve()), None, 0, "reference: search.reference")


# --------------------------------------------------------------------------------------------
# anchor rows
# --------------------------------------------------------------------------------------------

ANCHOR_DIR = "anchors"
ANCHORS = ANCHOR_WORDS  # kind -> the strategy column's words
SCORES_FILE = "scores.json"


def anchor_rows(base: TrialConfig, splits, folder: Path, tracker=None, parent_run_id: str | None = None
                ) -> dict[str, dict[str, Any]]:
    """The two rows every comparison is read against, scored against the reference exactly as
    a trial's samples are: `base` = the study's model before any fine-tuning, sampled with the
    trials' prompts and seeds; `real` = the held-out real images (none without a held-out set).
    Each is one MLflow child run of the sweep (tags sar_ray.kind=anchor, sar_ray.anchor=kind)
    and `anchor/<kind>/<metric>` metrics on the parent; computed once: a row whose scores and
    finished run exist is read back, not recomputed (--resume)."""
    from .evaluate import evaluate, is_model_output

    eval_cfg = base.eval.model_copy(update={"normalization": base.data.normalization})
    rows: dict[str, dict[str, Any]] = {}
    for kind, label in ANCHORS.items():
        if kind == "real" and splits.holdout is None:
            continue
        out = folder / kind
        done = _logged_anchor(out, tracker)
        if done is not None:
            rows[kind] = done
            continue
        out.mkdir(parents=True, exist_ok=True)
        if kind == "base":
            generated = out / "samples"
            if not is_model_output(generated):  # generate() writes its marker last
                sample_base_model(base, generated)
        else:
            generated = Path(splits.holdout)
        # Held-out real images need not be captioned: clip then scores its image distances
        # only (clip/fd, clip/kid: a clip objective's realism keeps its held-out end), and says so.
        scored = evaluate(generated, splits.reference, eval_cfg, out=out / "metrics.json", progress=False,
                          reference_columns=reference_columns(base.data),
                          skip_unreadable_reference=base.data.on_corrupt == "skip", require_prompts=kind != "real")
        metrics = {k: v for k, v in scored.flat().items() if v is not None and math.isfinite(v)}
        row = {"kind": kind, "strategy": label, "metrics": metrics, "images": scored.n_generated,
               "warnings": scored.warnings}
        if tracker is not None:
            row["run_id"] = _log_anchor(tracker, parent_run_id, out, row, generated if kind == "base" else None)
        (out / SCORES_FILE).write_text(json.dumps(row, indent=2))
        rows[kind] = row
    return rows


def _logged_anchor(out: Path, tracker) -> dict[str, Any] | None:
    path = out / SCORES_FILE
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    if tracker is None or tracker.run_status(row.get("run_id", "")) == "FINISHED":
        return row
    return None  # another store, a deleted or unfinished run: score it again


def _log_anchor(tracker, parent_run_id: str | None, out: Path, row: dict[str, Any], samples: Path | None) -> str:
    run_id = tracker.start_run(f"anchor/{row['kind']}", parent_run_id=parent_run_id,
                               tags={"sar_ray.kind": "anchor", "sar_ray.anchor": row["kind"],
                                     "sar_ray.strategy": row["strategy"], "sar_ray.images": str(row["images"])})
    tracker.log_metrics(run_id, [(k, v, 0) for k, v in row["metrics"].items()])
    tracker.log_artifact(run_id, out / "metrics.json")
    if samples is not None:
        tracker.log_artifacts(run_id, samples, "samples/final")
    if row["warnings"]:
        tracker.set_tags(run_id, {"sar_ray.eval_warnings": " | ".join(row["warnings"])[:5000]})
    tracker.end_run(run_id, "FINISHED")
    if parent_run_id:
        tracker.log_metrics(parent_run_id, [(f"anchor/{row['kind']}/{k}", v, 0) for k, v in row["metrics"].items()])
    return run_id


def sample_base_model(cfg: TrialConfig, out: Path) -> Path:
    """The untuned model's samples (the trials' prompts, seeds, scheduler and resolution), with
    the same sampler as a trial's final samples. On a GPU study one Ray task with a GPU does it
    (the driver may have none); on CPUs the driver samples in-process."""
    if not cfg.scaling.use_gpu:
        _sample_untuned(cfg.model_dump(mode="json"), str(out), "cpu")
        return out
    import ray

    task = ray.remote(num_gpus=1, num_cpus=cfg.scaling.cpus_per_worker)(_sample_untuned)
    ray.get(task.remote(cfg.model_dump(mode="json"), str(out), "cuda"))
    return out


def _sample_untuned(cfg_raw: dict, out: str, device: str) -> None:
    from .sample import generate, load_pipeline

    cfg = TrialConfig.model_validate(cfg_raw)
    pipe = load_pipeline(cfg.model, None, cfg.sample.scheduler, device)
    generate(pipe, cfg.sample, cfg.sample_resolution, out, device=device, mixed_precision=cfg.train.mixed_precision,
             normalization=cfg.data.normalization)


def realism_of(value: float | None, anchors: dict[str, dict[str, Any]], metric: str) -> float | None:
    """`report.realism` of `value` between the sweep's anchor rows on `metric`."""
    from .report import realism

    try:
        return realism(value, anchors["base"]["metrics"].get(metric), anchors["real"]["metrics"].get(metric))
    except KeyError:  # no held-out anchor (or no anchors at all)
        return None


def _rows(grid, study: StudyConfig) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        cfg_params, repeat = search_point(r.config) if r.config else ({}, 0)
        metrics = {k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        strategy = combination = None
        try:
            s = study.trial(**cfg_params).strategy
            strategy, combination = s.slug, s.combination
        except Exception:  # noqa: BLE001 - a point that failed validation still gets a row
            pass
        rows.append({
            "trial_id": trial_id,
            "params": cfg_params,
            "repeat": repeat,
            "seed": study.train.seed + repeat,
            "strategy": strategy,
            "combination": combination,  # the report's name for it (no ranks)
            "status": "ERROR" if r.error else ("DONE" if (r.metrics or {}).get(FINISHED_KEY) else "STOPPED"),
            "error": failure_message(r.error) if r.error else None,
            "metrics": metrics,
        })
    return rows


def _best(rows: list[dict[str, Any]], search: SearchConfig) -> dict[str, Any] | None:
    """The best point on the first objective, ranked as the report ranks its rows
    (`report.group_points`, then `report.ranked`): with search.repeats > 1 the point whose mean
    over its finished seed replicas is best, so that the sweep's best is not the luckiest seed,
    and a point some of whose seeds did not finish (ASHA stopped them, or they failed) only
    where no point finished all its seeds. Its first finished replica's row, with the point's
    value of the objective, `trials` naming the replicas it averages and `seeds` how many the
    point ran."""
    from .report import TrialRow, _finite, _metric_key, group_points, ranked

    o = search.objectives[0]
    key = _metric_key(o.metric)
    # a TrialRow's run_id is its row's index in `rows`: the sweep has no MLflow run ids here
    trial_rows = []
    for i, r in enumerate(rows):
        value = r["metrics"].get(o.metric)
        trial_rows.append(TrialRow(
            str(i), str(r["trial_id"]), str(r["strategy"]), "FINISHED" if r["status"] == "DONE" else r["status"],
            {}, {key: value} if _finite(value) else {}, trial_id=str(r["trial_id"]),
            point=r["params"], seed=r.get("seed") if search.repeats > 1 else None))
    order = ranked(group_points(trial_rows), o)
    if not order:
        return None
    top = order[0]
    # the replicas its mean is over: finished, with a value (group_points averages those)
    members = [m for m in top.repeats if _finite(m.metrics.get(key))] or [top]
    first = rows[int(members[0].run_id)]
    return {**first, "metrics": {**first["metrics"], o.metric: top.metrics[key]},
            "trials": [rows[int(m.run_id)]["trial_id"] for m in members],
            "seeds": max(len(top.repeats), 1) + top.unfinished}


# --------------------------------------------------------------------------------------------
# live trial table
# --------------------------------------------------------------------------------------------


class _FailureBudget(Callback):
    """`search.max_failures` retries for every trial from this driver on. Tune keeps each trial's
    `max_failures` (and its count of failures) in the experiment state, so after `--resume` a
    changed `search.max_failures` (not part of the study's fingerprint, so that it may change)
    was ignored, and a trial that had used up its retries got none. Now a resumed trial gets
    `search.max_failures` more retries, counted from its failures so far."""

    def __init__(self, retries: int):
        self.retries = retries
        self.spent: dict[str, int] = {}  # trial id -> its failures when this driver first saw it

    def __getstate__(self) -> dict[str, Any]:
        return {"retries": self.retries}  # a restored copy is replaced by this driver's (_resume_with)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["retries"])

    def on_step_begin(self, iteration, trials, **info):
        for t in trials:
            spent = self.spent.setdefault(t.trial_id, t.run_metadata.num_failures)
            t.max_failures = spent + self.retries


class _TrialTable(Callback):
    """Tune callback on the driver: a live table of the trials (status, strategy, rank, lr,
    latest loss and metric), and MLflow status for trials Tune stops or loses."""

    def __init__(self, study: StudyConfig, console, tracker):
        self.study, self.console, self.tracker = study, console, tracker
        self.rows: dict[str, dict[str, Any]] = {}
        self.live = None

    # Tune pickles its run config (callbacks included) into the experiment state; the console,
    # the MLflow client and the live display stay with the driver that runs the sweep.
    def __getstate__(self) -> dict[str, Any]:
        return {"study": self.study.model_dump(mode="json")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(StudyConfig.model_validate(state["study"]), _DRIVER.get("console"), _DRIVER.get("tracker"))

    # -- rendering
    def _render(self):
        from rich.table import Table

        metric = self.study.search.objectives[0].metric
        t = Table(title=f"sweep {self.study.name}", expand=False)
        for col in ("trial", "status", "strategy", "lr", "step", "loss", "val loss", metric):
            t.add_column(col)
        for tid, r in sorted(self.rows.items()):
            t.add_row(tid, r.get("status", ""), r.get("strategy", ""), r.get("lr", ""), str(r.get("step", "")),
                      _f(r.get("loss")), _f(r.get("val_loss")), _f(r.get(metric)))
        return t

    def start(self) -> None:
        if self.console is not None:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()

    def _row(self, trial) -> dict[str, Any]:
        row = self.rows.setdefault(trial.trial_id, {})
        params = search_point(trial.config)[0] if trial.config else {}
        if "strategy" not in row:
            try:
                cfg = self.study.trial(**params)
                row["strategy"] = cfg.strategy.slug
                row["lr"] = f"{cfg.train.lr:.1e}"
            except Exception:  # noqa: BLE001
                row["strategy"] = "?"
        return row

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    # -- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "RUNNING"
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["status"] = "RUNNING"
        for k, v in result.items():
            if isinstance(v, (int, float)):
                row[k] = v
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        done = bool((trial.last_result or {}).get(FINISHED_KEY))
        row["status"] = "DONE" if done else "STOPPED"
        if not done:
            self._close_child(trial, "KILLED", "stopped early by the scheduler")
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "ERROR"
        self._close_child(trial, "FAILED", None)
        self._refresh()

    def _close_child(self, trial, status: str, note: str | None) -> None:
        """A trial Tune stopped (ASHA) or lost never ended its MLflow run itself."""
        if self.tracker is None:
            return
        from .tracking import remembered_run

        out = sweep_folder(self.study) / "trials" / trial.trial_id
        run_id = remembered_run(out, self.tracker.uri)
        if not run_id:
            return
        try:
            run = self.tracker.client.get_run(run_id)
            if run.info.status == "RUNNING":
                if note:
                    self.tracker.set_tags(run_id, {"sar_ray.stopped": note})
                self.tracker.end_run(run_id, status)
        except Exception:  # noqa: BLE001 - bookkeeping must not break the sweep
            pass


def _f(x) -> str:
    return "" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def summary(r: SweepResult, objective: str, mode: str = "min") -> str:
    from rich.markup import escape

    done = sum(1 for t in r.trials if t["status"] == "DONE")
    stopped = sum(1 for t in r.trials if t["status"] == "STOPPED")
    failed = sum(1 for t in r.trials if t["status"] == "ERROR")
    lines = [f"[bold]sweep {r.name}[/bold]: {len(r.trials)} trials ({done} done, {stopped} stopped early, "
             f"{failed} failed) in {r.wall_s:.0f} s"]
    if r.best:
        trials, seeds = r.best.get("trials") or [], r.best.get("seeds", 1)
        of = f"{len(trials)} of {seeds} seeds" if seeds > len(trials) else f"{len(trials)} seeds"
        which = (f"trials {', '.join(trials)}, mean over {of}" if len(trials) > 1
                 else f"trial {r.best['trial_id']}" + (f", {of}" if seeds > 1 else ""))
        lines.append(f"  best      {escape(_combination(r.best))} ({which}): "
                     f"{objective} = {r.best['metrics'].get(objective):.4g}")
    lines += [escape(line) for line in comparison_lines(r, objective, mode)]
    if r.splits_note:  # where the reference and the held-out anchor came from (or why there is none)
        lines.append(f"  splits    {escape(r.splits_note)}")
    lines.append(f"  trials    {r.folder / 'trials'}")
    if r.report:
        lines.append(f"  report    {r.report / 'report.md'}")
    if r.run_url:
        lines.append(f"  mlflow    {escape(r.run_url)}")
    return "\n".join(lines)


def _combination(row: dict[str, Any]) -> str:
    """A trial row's strategy as report.md names it (the combination, no LoRA ranks: those are
    in its trial label when searched)."""
    return str(row.get("combination") or row["strategy"])


def comparison_lines(r: SweepResult, objective: str, mode: str = "min") -> list[str]:
    """The anchors and every finished trial, best first: strategy, trial (id and sampled
    values), objective, realism (0: the untuned model, 1: real held-out SAR)."""
    from .report import point_label

    if not r.anchors:
        return []
    metric = r.realism_metric or objective
    rows = [(a["strategy"], "-", a["metrics"].get(objective), realism_of(a["metrics"].get(metric), r.anchors, metric))
            for a in r.anchors.values()]
    done = [t for t in r.trials if t["status"] == "DONE" and isinstance(t["metrics"].get(objective), (int, float))]
    sign = -1 if mode == "max" else 1  # best first; a NaN objective (not computed) last, not anywhere
    done.sort(key=lambda t: (0, sign * t["metrics"][objective]) if math.isfinite(t["metrics"][objective]) else (1, 0))
    rows += [(_combination(t), point_label(t["trial_id"], t["params"], t.get("seed") if t.get("repeat") else None),
              t["metrics"][objective], t.get("realism")) for t in done]
    width = max(len(x[0]) for x in rows)
    twidth = max(len(x[1]) for x in rows)
    head = f"  {'strategy':<{width}}  {'trial':<{twidth}}  {objective:>12}  realism ({metric})"
    return ["  anchors   realism = (base - trial) / (base - real) on " + metric, head] + [
        f"  {a:<{width}}  {b:<{twidth}}  {_f(c):>12}  {_f(d)}" for a, b, c, d in rows]
