"""The strategy comparison of a sweep: one row per strategy combination (its best trial).

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
import json
import math
from dataclasses import dataclass
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
    strategy: str  # modes + token, without rank (the "combination")
    status: str
    params: dict[str, str]
    metrics: dict[str, float]


def _combination(params: dict[str, str]) -> str:
    """The strategy combination of a run: each component's mode and the token, no ranks."""
    parts = [f"unet-{params.get('strategy.unet.mode', '?')}", f"te-{params.get('strategy.text_encoder.mode', '?')}"]
    te2 = params.get("strategy.text_encoder_2")
    if te2 and te2 != "None":
        try:
            parts.append(f"te2-{json.loads(te2.replace(chr(39), chr(34)))['mode']}")
        except (ValueError, KeyError, TypeError):
            pass
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
        params = dict(r.data.params)
        rows.append(TrialRow(r.info.run_id, r.info.run_name or r.info.run_id, _combination(params), r.info.status,
                             params, {k: float(v) for k, v in r.data.metrics.items()}))
    return rows


def latest_sweep(tracker) -> str | None:
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.`sar_ray.kind` = 'sweep'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def best_per_strategy(rows: list[TrialRow], objective: ObjectiveConfig) -> list[TrialRow]:
    best: dict[str, TrialRow] = {}
    for r in rows:
        v = r.metrics.get(_metric_key(objective.metric))
        if r.status != "FINISHED" or v is None or not math.isfinite(v):
            continue
        cur = best.get(r.strategy)
        if cur is None or _better(v, cur.metrics[_metric_key(objective.metric)], objective.mode):
            best[r.strategy] = r
    key = _metric_key(objective.metric)
    return sorted(best.values(), key=lambda r: r.metrics[key] * (1 if objective.mode == "min" else -1))


def _metric_key(metric: str) -> str:
    """Tune reports `val_loss`; the MLflow child run logs it as `val/loss`."""
    return {"val_loss": "val/loss", "loss": "train/loss"}.get(metric, metric)


def pareto_front(rows: list[TrialRow], objectives: list[ObjectiveConfig]) -> list[TrialRow]:
    keys = [(_metric_key(o.metric), o.mode) for o in objectives]
    ok = [r for r in rows if all(isinstance(r.metrics.get(k), float) and math.isfinite(r.metrics[k]) for k, _ in keys)]

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


def separability(rows: list[TrialRow], key: str) -> dict[str, str]:
    """``{run_id: verdict}`` for rows sorted best first: the first is ``best``; another is ``not
    separable from the best`` when its interval of `key` overlaps the best one's, else ``worse``
    (``no interval`` where either has none, e.g. a validation loss)."""
    if not rows:
        return {}
    best = interval_of(rows[0], key)
    out = {rows[0].run_id: BEST}
    for r in rows[1:]:
        ci = interval_of(r, key)
        if best is None or ci is None:
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
    objective = objective or ObjectiveConfig()
    rows = collect(tracker, parent_run_id)
    best = best_per_strategy(rows, objective)
    key = _metric_key(objective.metric)

    verdict = separability(best, key)
    header = ["strategy", "best trial", objective.metric, "vs best"] + [label for label, _ in COLUMNS]
    table = [[r.strategy, r.name, _fmt_ci(r, key), verdict[r.run_id]] + [_fmt_ci(r, k) for _, k in COLUMNS]
             for r in best]
    # The CSV keeps numbers in cells of their own: value, then each interval's bounds.
    ci_keys = [k for k in [key, *(k for _, k in COLUMNS)] if any(interval_of(r, k) for r in best)]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "best trial", objective.metric, "vs best"] + [label for label, _ in COLUMNS]
                   + [f"{k}{s}" for k in ci_keys for s in CI_SUFFIXES])
        w.writerows([[r.strategy, r.name, _fmt(r.metrics.get(key)), verdict[r.run_id]]
                     + [_fmt(r.metrics.get(k)) for _, k in COLUMNS]
                     + [_fmt(r.metrics.get(k + s)) for k in ci_keys for s in CI_SUFFIXES] for r in best])
    n_done = sum(r.status == "FINISHED" for r in rows)
    md = [f"# Strategy comparison: {tracker.experiment}", "",
          f"Sweep run `{parent_run_id}`: {len(rows)} trials, {n_done} finished; one row per strategy combination "
          f"(its best trial by `{objective.metric}`, {objective.mode}).", ""]
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
        md += [f"| {r.name} | {r.strategy} | " + " | ".join(_fmt(r.metrics.get(_metric_key(o.metric))) for o in objectives)
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
    for r in best:
        try:
            local = tracker.client.download_artifacts(r.run_id, "samples/final/grid.png", str(out / "_dl" / r.run_id))
        except Exception:  # noqa: BLE001 - a trial without samples still gets its table row
            continue
        grids.append((r.strategy, Path(local)))
    if grids:
        fig, axes = plt.subplots(len(grids), 1, figsize=(8, 3.2 * len(grids)), squeeze=False)
        for ax, (name, path) in zip(axes[:, 0], grids):
            ax.imshow(plt.imread(path), cmap="gray")
            ax.set_title(name, fontsize=9)
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
