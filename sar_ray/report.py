"""The strategy comparison of a sweep: one row per strategy combination (its best search point),
read against two anchor rows, ``base (untuned)`` and ``real (held out)`` (see sweep.anchor_rows),
with a ``realism`` column placing each row between them (0: untuned, 1: real SAR).

Reads the sweep's MLflow runs through `tracking.Tracker` (so a report can be rebuilt from any
machine that reaches the tracking server) and writes `report.md`, `report.csv`, plots of the
objective against LoRA rank and learning rate, and one sample grid per strategy. A
multi-objective study also gets its Pareto front.

Every metric a trial logged with a bootstrap interval (``<metric>.ci_lo`` / ``.ci_hi``, from
``sar_ray.evaluate``) is shown as ``value [lo, hi]``; the ``vs best`` column marks the
strategies whose objective interval overlaps the best one's as not separable from it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import textwrap
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import ObjectiveConfig
from .metrics.families import CI_SUFFIXES, report_columns

# The columns of the reference study's comparison table: (label, metric key); the metric
# families' own (sar_ray.metrics.families), then training and cost.
COLUMNS = [
    *report_columns(),
    ("val loss", "val/loss"),
    ("trainable params", "cost/trainable_params"),
    ("GPU-hours", "cost/gpu_hours"),
    ("wall s", "cost/wall_s"),
]


@dataclass
class TrialRow:
    run_id: str
    name: str
    strategy: str  # modes + token, without rank (the "combination"); an anchor's own words
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    kind: str = "trial"  # or "anchor": base (untuned) / real (held out)
    trial_id: str | None = None  # the Tune trial id (sar_ray.trial_id)
    point: dict[str, Any] = field(default_factory=dict)  # the sampled values (sar_ray.params)
    seed: int | None = None  # train.seed of this replica (search.repeats)
    repeats: list[TrialRow] = field(default_factory=list)  # a point's seed replicas (group_points)
    unfinished: int = 0  # replicas of this point that did not finish (stopped early, failed)

    @property
    def seeds(self) -> str | None:
        """``3 seeds``, or ``2 of 3 seeds`` where some of the point's replicas did not finish;
        None for a trial run once."""
        done = len(self.repeats) or 1
        if done + self.unfinished <= 1:
            return None
        return f"{done} of {done + self.unfinished} seeds" if self.unfinished else f"{done} seeds"

    @property
    def label(self) -> str:
        """The trial by id and sampled values; a point's replicas by their count."""
        if self.kind == "anchor":
            return "-"
        if len(self.repeats) > 1:
            return point_label(self.seeds, self.point)
        name = self.trial_id or self.name
        return point_label(f"{name}, {self.seeds}" if self.seeds else name, self.point)


def _short(key: str) -> str:
    """`strategy.unet.lr` -> `unet.lr`, `train.lr` -> `lr`, `strategy.token` -> `token`."""
    for prefix in ("strategy.", "train.", "data.", "sample."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2g}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}={_short_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def point_label(trial_id: str, params: dict[str, Any], seed: int | None = None) -> str:
    """``a1b2c_00003 (unet.mode=lora, unet.rank=8, lr=3e-04)``: a row names its trial, not only
    its strategy slug (two trials of one combination differ in their sampled values)."""
    values = [f"{_short(k)}={_short_value(v)}" for k, v in sorted(params.items())]
    if seed is not None:
        values.append(f"seed={seed}")
    return f"{trial_id} ({', '.join(values)})" if values else str(trial_id)


def _combination(params: dict[str, str]) -> str:
    """The strategy combination of a run: each component's mode and the token, no ranks."""
    parts = [f"unet-{params.get('strategy.unet.mode', '?')}", f"te-{params.get('strategy.text_encoder.mode', '?')}"]
    # SDXL's second text encoder, when it has its own strategy: logged flat like the others
    # (strategy.text_encoder_2.mode); runs logged before that kept it as one dict string.
    te2 = params.get("strategy.text_encoder_2.mode")
    if te2 is None and params.get("strategy.text_encoder_2") not in (None, "", "None"):
        try:
            te2 = json.loads(params["strategy.text_encoder_2"].replace(chr(39), chr(34)))["mode"]
        except (ValueError, KeyError, TypeError):
            te2 = None
    if te2 is not None:
        parts.append(f"te2-{te2}")
    parts.append(f"vae-{params.get('strategy.vae.mode', '?')}")
    if params.get("strategy.token") == "learn":
        parts.append("tok")
    return "_".join(parts)


def collect(tracker, parent_run_id: str) -> list[TrialRow]:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", max_results=5000
    )
    rows = []
    for r in runs:
        params, tags = dict(r.data.params), dict(getattr(r.data, "tags", {}) or {})
        metrics = {k: float(v) for k, v in r.data.metrics.items()}
        if tags.get("sar_ray.kind") == "anchor":
            rows.append(TrialRow(r.info.run_id, r.info.run_name or r.info.run_id,
                                 tags.get("sar_ray.strategy", tags.get("sar_ray.anchor", "anchor")), r.info.status,
                                 params, metrics, kind="anchor", trial_id=tags.get("sar_ray.anchor")))
            continue
        try:
            point = json.loads(tags.get("sar_ray.params", "{}"))
        except ValueError:
            point = {}
        seed = tags.get("sar_ray.seed")
        rows.append(TrialRow(r.info.run_id, r.info.run_name or r.info.run_id, _combination(params), r.info.status,
                             params, metrics, trial_id=tags.get("sar_ray.trial_id"), point=point,
                             seed=int(seed) if seed not in (None, "") else None))
    return rows


def anchors_of(rows: list[TrialRow]) -> dict[str, TrialRow]:
    """{"base": row, "real": row} of the anchor runs that finished (the newest of each kind:
    `rows` come newest first, as MLflow's search_runs lists them, so the first one wins)."""
    out: dict[str, TrialRow] = {}
    for r in rows:
        if r.kind == "anchor" and r.status == "FINISHED" and r.trial_id:
            out.setdefault(r.trial_id, r)
    return out


def group_points(rows: list[TrialRow]) -> list[TrialRow]:
    """One row per search point: the seed replicas of a point (search.repeats: the same
    sampled values, seeds train.seed + k) become one row holding each metric's mean over
    them, and, where they have bootstrap intervals, the envelope from the lowest lower bound
    to the highest upper bound (image noise and seed noise together). A single trial stays
    as it is.

    Replicas are told apart by their seed: two trials of one point with the same seed (an
    Optuna sampler that suggested a point twice, grid passes with num_samples > 1) are two
    rows, never "2 seeds". Only the finished replicas are averaged (an ASHA-stopped one has
    no final evaluation, and its early validation loss is not comparable): a point counts as
    finished when any replica did, and its row says how many of its seeds that is
    (`unfinished`; `best_per_strategy` ranks such a point after the complete ones)."""
    groups: dict[tuple, list[TrialRow]] = {}
    seen: dict[tuple, int] = {}
    for r in sorted(rows, key=lambda r: (r.trial_id or "", r.run_id)):
        if r.seed is None:
            groups[(r.run_id,)] = [r]
            continue
        point = (r.strategy, json.dumps(r.point, sort_keys=True, default=str))
        nth = seen.get((*point, r.seed), 0)  # the nth trial of this point with this seed
        seen[(*point, r.seed)] = nth + 1
        groups.setdefault((*point, nth), []).append(r)
    out = []
    for members in groups.values():
        finished = [m for m in members if m.status == "FINISHED"]
        unfinished = len(members) - len(finished) if finished else 0
        if len(members) == 1 or len(finished) == 1:
            one = finished[0] if finished else members[0]
            out.append(dataclasses.replace(one, unfinished=unfinished) if unfinished else one)
            continue
        members = finished or members
        first = members[0]
        keys = set().union(*(m.metrics for m in members))
        metrics = {}
        for k in keys:
            vals = [m.metrics[k] for m in members if _finite(m.metrics.get(k))]
            if not vals:
                continue
            if k.endswith(CI_SUFFIXES[0]):
                metrics[k] = min(vals)
            elif k.endswith(CI_SUFFIXES[1]):
                metrics[k] = max(vals)
            else:
                metrics[k] = sum(vals) / len(vals)
        out.append(TrialRow(first.run_id, first.name, first.strategy, first.status, first.params, metrics,
                            trial_id=first.trial_id, point=first.point, repeats=sorted(members, key=lambda m: m.seed),
                            unfinished=unfinished))
    return out


def spread(r: TrialRow, key: str) -> tuple[float, float, float] | None:
    """(std, min, max) of `key` over a point's seed replicas; None for a single trial."""
    vals = [m.metrics[key] for m in r.repeats if _finite(m.metrics.get(key))]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return std, min(vals), max(vals)


def realism_metric(objective: ObjectiveConfig, families: Iterable[str] | None = None) -> str:
    """The metric `realism` is measured on: the objective where it is a set distance (a
    registered metric, lower is better: stats/*, glcm/*, clip/fd, clip/kid), else the first
    distance column of the measured metric `families` (the study's `eval.metrics`; None: every
    registered family). A study that measures glcm alone gets glcm's, not an unmeasured stats/js."""
    from .metrics.families import FAMILIES, metric_direction

    try:
        if metric_direction(objective.metric) == "min":
            return objective.metric
    except KeyError:  # val_loss, a cost: not a distance between image sets
        pass
    measured = list(FAMILIES) if families is None else [f for f in FAMILIES if f in set(families)]
    distances = [k for f in measured for _, k in FAMILIES[f].columns if metric_direction(k) == "min"]
    if not distances:  # nothing measured that is a distance: the registry's first, which no row has
        distances = [k for _, k in report_columns() if metric_direction(k) == "min"]
    return distances[0]


def measured_families(rows: Iterable[TrialRow]) -> list[str]:
    """The metric families the rows carry values of (`stats/js` -> stats), in registry order."""
    from .metrics.families import FAMILIES

    seen = {k.split("/", 1)[0] for r in rows for k in r.metrics if "/" in k}
    return [f for f in FAMILIES if f in seen]


def realism(value: float | None, base: float | None, real: float | None) -> float | None:
    """Progress from the untuned model (0) to real held-out SAR (1): (base - value) / (base -
    real). The same formula holds for a metric to maximise (both differences change sign).
    None without both anchors, or where they coincide."""
    if any(x is None or not math.isfinite(x) for x in (value, base, real)) or base == real:
        return None
    return (base - value) / (base - real)


def latest_sweep(tracker) -> str | None:
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.`sar_ray.kind` = 'sweep'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def sweep_objectives(tracker, parent_run_id: str) -> list[ObjectiveConfig] | None:
    """The objectives a sweep ranked by (its parent run's `search.objectives` param; for sweeps
    logged before that param, its `sweep.yaml` artifact), or None when neither is readable."""
    import tempfile

    import yaml

    try:
        raw = tracker.client.get_run(parent_run_id).data.params.get("search.objectives")
        if raw is not None:
            found = json.loads(raw)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = tracker.client.download_artifacts(parent_run_id, "sweep.yaml", tmp)
                found = (yaml.safe_load(Path(local).read_text()).get("search") or {}).get("objectives")
        return [ObjectiveConfig(**o) for o in found] or None
    except Exception:  # noqa: BLE001 - an older or foreign run: the caller's default
        return None


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def ranked(rows: list[TrialRow], objective: ObjectiveConfig) -> list[TrialRow]:
    """The finished rows (points, after `group_points`) with a value of `objective`, best
    first: the one ranking rule of the report and the sweep's `best`.

    A point some of whose seeds did not finish (`unfinished`: ASHA stopped them) ranks after
    the points whose every seed finished, where there are any: its mean is over the seeds the
    scheduler kept for doing well, so it would win on luck what the complete points had to
    earn on every seed."""
    key = _metric_key(objective.metric)
    sign = 1 if objective.mode == "min" else -1
    done = [r for r in rows if r.status == "FINISHED" and _finite(r.metrics.get(key))]
    rank = partial_last(done, key)
    return sorted(done, key=lambda r: (rank(r), r.metrics[key] * sign))


def best_per_strategy(rows: list[TrialRow], objective: ObjectiveConfig) -> list[TrialRow]:
    """Each strategy's best finished row on `objective` (`ranked`), best first."""
    best: dict[str, TrialRow] = {}  # in ranked order: a strategy first appears with its best row
    for r in ranked(rows, objective):
        best.setdefault(r.strategy, r)
    return list(best.values())


def partial_last(rows: list[TrialRow], key: str):
    """A sort key: 1 for a row some of whose seeds did not finish, or finished without a value of
    `key` (its mean is over the others), when some row has all its seeds' values; else 0 (where
    every point lost a seed, they compete on their means)."""
    def partial(r: TrialRow) -> bool:
        return bool(r.unfinished) or any(not _finite(m.metrics.get(key)) for m in r.repeats)

    any_complete = any(not partial(r) for r in rows)
    return lambda r: int(partial(r) and any_complete)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _metric_key(metric: str) -> str:
    """Tune reports `val_loss`; the MLflow child run logs it as `val/loss`."""
    return {"val_loss": "val/loss", "loss": "train/loss"}.get(metric, metric)


def pareto_front(rows: list[TrialRow], objectives: list[ObjectiveConfig]) -> list[TrialRow]:
    keys = [(_metric_key(o.metric), o.mode) for o in objectives]
    ok = [r for r in rows if all(_finite(r.metrics.get(k)) for k, _ in keys)]

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        no_worse = all(not _better(b.metrics[k], a.metrics[k], m) for k, m in keys)
        strictly = any(_better(a.metrics[k], b.metrics[k], m) for k, m in keys)
        return no_worse and strictly

    return [r for r in ok if not any(dominates(o, r) for o in ok if o is not r)]


def interval_of(r: TrialRow, key: str) -> tuple[float, float] | None:
    """The run's logged bootstrap interval of `key`, or None."""
    lo, hi = (r.metrics.get(key + s) for s in CI_SUFFIXES)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return lo, hi


BEST, NOT_SEPARABLE, WORSE, NO_INTERVAL = "best", "not separable from the best", "worse", "no interval"
PARTIAL = "ranked last: not every seed finished"
# The strategy column's words for the anchor rows (sweep.anchor_rows logs them).
ANCHOR_WORDS = {"base": "base (untuned)", "real": "real (held out)"}


def separability(rows: list[TrialRow], key: str) -> dict[str, str]:
    """``{run_id: verdict}`` for rows sorted best first: the first is ``best``; another is ``not
    separable from the best`` when its interval of `key` overlaps the best one's, else ``worse``
    (``no interval`` where either has none, e.g. a validation loss); a point ranked after the
    complete ones because some of its seeds did not finish (`partial_last`) says so instead."""
    if not rows:
        return {}
    best = interval_of(rows[0], key)
    out = {rows[0].run_id: BEST}
    rank = partial_last(rows, key)
    for r in rows[1:]:
        ci = interval_of(r, key)
        if rank(r):
            out[r.run_id] = PARTIAL
        elif best is None or ci is None:
            out[r.run_id] = NO_INTERVAL
        else:
            out[r.run_id] = NOT_SEPARABLE if ci[0] <= best[1] and best[0] <= ci[1] else WORSE
    return out


def _fmt_ci(r: TrialRow, key: str) -> str:
    ci = interval_of(r, key)
    v = _fmt(r.metrics.get(key))
    return f"{v} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and v != "-" else v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def build_report(tracker, parent_run_id: str | None, out: str | Path, objective: ObjectiveConfig | None = None,
                 objectives: list[ObjectiveConfig] | None = None) -> Path:
    """Write the comparison report for one sweep (default: the experiment's latest) and log it
    to the sweep's parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parent_run_id = parent_run_id or latest_sweep(tracker)
    if parent_run_id is None:
        raise ValueError(f"experiment {tracker.experiment!r} has no sweep runs; run `sar-ray sweep` first")
    if objective is None and objectives is None:  # `sar-ray report` without --metric: the sweep's own
        objectives = sweep_objectives(tracker, parent_run_id)
    objective = objective or (objectives[0] if objectives else ObjectiveConfig())
    every = collect(tracker, parent_run_id)
    anchors = anchors_of(every)
    rows = [r for r in every if r.kind == "trial"]
    best = best_per_strategy(group_points(rows), objective)
    key = _metric_key(objective.metric)
    on = realism_metric(objective, measured_families([*anchors.values(), *rows]) or None)

    def realism_cell(r: TrialRow) -> float | None:
        return realism(r.metrics.get(on), *((anchors[k].metrics.get(on) if k in anchors else None)
                                            for k in ("base", "real")))

    def spread_cell(r: TrialRow, csv_cells: bool = False):
        sp = spread(r, key)
        if csv_cells:
            return [len(r.repeats) or 1] + ([_fmt(x) for x in sp] if sp else ["-"] * 3)
        return f"± {_fmt(sp[0])} ({_fmt(sp[1])}–{_fmt(sp[2])}, n={len(r.repeats)})" if sp else "-"

    shown = [anchors[k] for k in ("base", "real") if k in anchors] + best
    verdict = {**{a.run_id: "anchor" for a in anchors.values()}, **separability(best, key)}
    labels = [label for label, _ in COLUMNS]
    header = ["strategy", "trial", objective.metric, "seed spread", "realism", "vs best"] + labels
    table = [[r.strategy, r.label, _fmt_ci(r, key), spread_cell(r), _fmt(realism_cell(r)), verdict[r.run_id]]
             + [_fmt_ci(r, k) for _, k in COLUMNS] for r in shown]
    # The CSV keeps numbers in cells of their own: value, then each interval's bounds.
    ci_keys = [k for k in [key, *(k for _, k in COLUMNS)] if any(interval_of(r, k) for r in shown)]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "trial", objective.metric, "realism", "vs best"] + labels
                   + [f"{k}{s}" for k in ci_keys for s in CI_SUFFIXES]
                   + ["trial_id", "params", "repeats", f"{key}.std", f"{key}.min", f"{key}.max"])
        w.writerows([[r.strategy, r.label, _fmt(r.metrics.get(key)), _fmt(realism_cell(r)), verdict[r.run_id]]
                     + [_fmt(r.metrics.get(k)) for _, k in COLUMNS]
                     + [_fmt(r.metrics.get(k + s)) for k in ci_keys for s in CI_SUFFIXES]
                     + [r.trial_id if r.kind == "trial" and not r.repeats else
                        (" ".join(m.trial_id or m.run_id for m in r.repeats) if r.repeats else "-"),
                        json.dumps(r.point, sort_keys=True, default=str) if r.kind == "trial" else "-"]
                     + spread_cell(r, csv_cells=True) for r in shown])
    n_done = sum(r.status == "FINISHED" for r in rows)
    md = [f"# Strategy comparison: {tracker.experiment}", "",
          f"Sweep run `{parent_run_id}`: {len(rows)} trials, {n_done} finished; one row per strategy combination "
          f"(its best search point by `{objective.metric}`, {objective.mode}), each named by its trial id and "
          "sampled values.", ""]
    if anchors:
        md += [f"Anchor rows, scored against the same reference as every trial: *{ANCHOR_WORDS['base']}* (the "
               f"model before fine-tuning, the trials' prompts and seeds) and *{ANCHOR_WORDS['real']}* (real images "
               f"held out of training and the reference). `realism` = (base - trial) / (base - real) on `{on}`"
               + ("" if on == key else f" (the objective `{objective.metric}` is not a set distance, so the first "
                  "distance column)") + ": 0 is the untuned model, 1 real SAR.", ""]
    if any(r.repeats for r in best):
        md += ["A point run with several seeds (`search.repeats`) shows the mean over its seeds; `seed spread`: "
               "their standard deviation and min–max; its interval spans its seeds' intervals.", ""]
    if any(r.unfinished for r in best):
        md += ["`k of n seeds`: the scheduler stopped (or a failure ended) the point's other seeds, so its mean "
               "is over the seeds that did well early; such a point ranks after the points whose every seed "
               f"finished (*{PARTIAL}*).", ""]
    if ci_keys:
        md += ["`value [lo, hi]`: 95% bootstrap interval over the trial's generated images. `vs best`: "
               f"*{NOT_SEPARABLE}* where the `{objective.metric}` interval overlaps the best strategy's "
               "(the data cannot tell them apart), *worse* where it lies clear of it.", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    if objectives and len(objectives) > 1:
        front = pareto_front([r for r in rows if r.status == "FINISHED"], objectives)
        md += ["", "## Pareto front", "", "| trial | strategy | " + " | ".join(o.metric for o in objectives) + " |",
               "|---|---|" + "---|" * len(objectives)]
        md += [f"| {r.label} | {r.strategy} | " + " | ".join(_fmt(r.metrics.get(_metric_key(o.metric))) for o in objectives)
               + " |" for r in front]

    # Objective against LoRA rank and learning rate, every finished trial.
    plots = []
    for comp in ("unet", "text_encoder"):
        pts = [(r, r.params.get(f"strategy.{comp}.rank"), r.params.get(f"strategy.{comp}.lr"),
                r.metrics.get(key)) for r in rows if r.status == "FINISHED"]
        pts = [p for p in pts if p[3] is not None and math.isfinite(p[3])]
        if not pts:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        lora = [p for p in pts if r_mode(p[0], comp) == "lora" and p[1] not in (None, "None")]
        if lora:
            _points(axes[0], [int(p[1]) for p in lora], [p[0] for p in lora], key)
        axes[0].set_xlabel(f"{comp} LoRA rank")
        lrs = [float(p[2]) if p[2] not in (None, "None") else float(p[0].params.get("train.lr", "nan")) for p in pts]
        _points(axes[1], lrs, [p[0] for p in pts], key)
        axes[1].set_xscale("log")
        axes[1].set_xlabel(f"{comp} learning rate")
        for ax in axes:
            ax.set_ylabel(objective.metric)
        fig.tight_layout()
        path = out / f"{objective.metric.replace('/', '_')}_vs_{comp}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append(path)
    md += [""] + [f"![{p.stem}]({p.name})" for p in plots]

    # One sample grid per strategy (its best trial's final samples).
    grids = []
    for r in shown:  # the untuned model's grid first: what the trials started from
        try:
            local = tracker.client.download_artifacts(r.run_id, "samples/final/grid.png", str(out / "_dl" / r.run_id))
        except Exception:  # noqa: BLE001 - a trial without samples still gets its table row
            continue
        grids.append((grid_title(r.strategy, None if r.kind == "anchor" else r.label), Path(local)))
    if grids:
        fig, axes = plt.subplots(len(grids), 1, figsize=(8, 3.2 * len(grids)), squeeze=False)
        for ax, (name, path) in zip(axes[:, 0], grids):
            ax.imshow(plt.imread(path), cmap="gray")
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "sample_grids.png", dpi=100)
        plt.close(fig)
        md += ["", "## Samples (best trial per strategy)", "", "![sample grids](sample_grids.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    for name in ["report.md", "report.csv", *(p.name for p in plots)] + (["sample_grids.png"] if grids else []):
        tracker.log_artifact(parent_run_id, out / name, "report")
    return out


def _points(ax, xs: list[float], runs: list[TrialRow], key: str) -> None:
    """The objective per trial, with its 95% interval as an error bar where the trial has one
    (so that a spread of 1e-5 between trials reads against the noise)."""
    ys = [r.metrics[key] for r in runs]
    ax.scatter(xs, ys)
    cis = [(x, y, interval_of(r, key)) for x, y, r in zip(xs, ys, runs)]
    cis = [(x, y, ci) for x, y, ci in cis if ci is not None]
    if cis:
        ax.errorbar([x for x, _, _ in cis], [y for _, y, _ in cis], fmt="none", capsize=3,
                    yerr=[[max(y - ci[0], 0) for _, y, ci in cis], [max(ci[1] - y, 0) for _, y, ci in cis]])


def r_mode(r: TrialRow, comp: str) -> str:
    return r.params.get(f"strategy.{comp}.mode", "")


def grid_title(strategy: str, label: str | None, width: int = 100) -> str:
    """A sample grid's title: the strategy, then its trial id and sampled values wrapped to
    `width` characters, so a long label is not cut off at the figure's edges."""
    return "\n".join([strategy, *textwrap.wrap(label or "", width)])
