"""Sweep efficiency: a full grid against Optuna + ASHA over the same space, and the sweep's
time outside trial training, on tiny models.

    python tests/bench/sweep_efficiency.py            # 12-point grid + 8 Optuna/ASHA trials: ~5-9 min on 2 busy cores
    python tests/bench/sweep_efficiency.py --quick    # 8-point grid + 5 trials, 20 steps: ~3 min
    python tests/bench/sweep_efficiency.py --num-samples 6 --max-steps 60 --workdir /tmp/se   # keep outputs
    python tests/bench/sweep_efficiency.py --quick --only grid --reuse-actors   # experiment: Tune reuses actors

In one process and one Ray (started once, before both sweeps, and timed apart), two sweeps of
the same study run one after the other through `sar_ray.sweep.run_sweep`:

  grid    algorithm grid, scheduler none: every point of the space trained to train.max_steps.
  search  algorithm optuna (seeded TPE), `--num-samples` trials, ASHA on val_loss
          (grace `--grace` steps, reduction factor 2, rungs every train.eval_every steps).

Space (conditional keys only where active, as sar_ray expands them):
  strategy.unet.mode {full, lora} x strategy.unet.rank {4, 8, 16} (lora only) x train.lr {1e-5, 1e-4, 1e-3}
  = (1 + 3) x 3 = 12 points (--quick: 2 learning rates, 8 points).
The model is tiny-sd at 32 px on small synthetic SAR, one prompt, one seed, one sampling step,
no MLflow, search.evaluate=false: the objective and ASHA's metric are both val_loss.

Printed:
  trial-steps   per sweep, the sum over trials of the last optimizer step each trained (from
                its train_log.jsonl, the compute actually spent, stopped trials included), and
                search / grid. Goal: <= 0.40.
  best          min val_loss at step max_steps over each sweep's trials that trained that far
                (from the logs, whatever sar_ray's status; SweepResult.best is printed too when
                it differs). "within 2%": (search best - grid best) / |grid best| <= 0.02. Same
                params give the same val_loss in both sweeps (same seeds), checked and printed.
  outside       fraction of sweep wall time outside trial training and evaluation:
                    outside = 1 - sum(busy_i) / (wall x concurrency)
                busy_i = [the trial's "start" event (model built, optimizer ready), its "end"
                event (final weights saved and samples written)]; for a trial ASHA stopped, its
                last logged step or val_loss. wall = SweepResult.wall_s (ray.init not included:
                paid once, before both sweeps; printed apart). concurrency = the sweep's
                max_concurrent_trials. Also printed: the fraction of wall time during which no
                trial was busy (the union of busy intervals), and phases:
                  start-up     sweep call -> first trial's config.yaml (data check, Tuner, first
                               trial actor start + imports)
                  launch       per trial, config.yaml written by run_trial -> "start" (Ray Train
                               local-mode trainer, dataset shard, model build, strategy)
                  between      previous trial busy end -> next trial's config.yaml (Tune result
                               handling, actor teardown, a new actor process + imports)
                  tail         last busy end -> run_sweep returned
                and inside busy time: train steps, validation, Tune report round trips, and
                the finish (save weights + final sample).
                Goal: outside < 10% for trials of a few minutes; the tiny trials here last
                seconds, so the per-trial fixed cost is also projected onto `--project-s`
                seconds of training per trial.

Not a test: pytest does not collect this file. Exits 0 whether or not the goals are met.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# No hub access (tiny models come from constructors); no uv runtime env for Ray workers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

STEPS_GOAL = 0.40
BEST_TOL = 0.02
OUTSIDE_GOAL = 0.10


# --------------------------------------------------------------------------------------------
# arguments and the study
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run: 8-point grid, 5 trials, 20 steps")
    p.add_argument("--max-steps", type=int, default=None, help="train.max_steps (default 40, quick 20)")
    p.add_argument("--eval-every", type=int, default=5, help="train.eval_every: ASHA's rung spacing (default 5)")
    p.add_argument("--grace", type=int, default=None, help="ASHA grace period in steps (default 10, quick 5)")
    p.add_argument("--num-samples", type=int, default=None, help="Optuna trials (default 8, quick 5)")
    p.add_argument("--lrs", default=None, help="comma-separated train.lr grid (default 1e-5,1e-4,1e-3; quick 1e-4,1e-3)")
    p.add_argument("--ranks", default="4,8,16", help="comma-separated LoRA ranks (default 4,8,16)")
    p.add_argument("--images", type=int, default=48, help="synthetic scenes (default 48)")
    p.add_argument("--resolution", type=int, default=32, help="pixels (default 32)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model", choices=["tiny-sd", "tiny-sdxl"], default="tiny-sd")
    p.add_argument("--concurrency", type=int, default=None,
                   help="search.max_concurrent_trials (default: what sar_ray fits on the cluster)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="scaling.cpus_per_worker (default 1)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--project-s", type=float, default=180.0,
                   help="training seconds per trial to project the fixed overhead onto (default 180)")
    p.add_argument("--reuse-actors", action="store_true",
                   help="experiment: patch ray.tune.TuneConfig(reuse_actors=True) into the sweeps "
                   "(sar_ray leaves Tune's default, False: a new actor process per trial)")
    p.add_argument("--only", choices=["grid", "search", "both"], default="both")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("max_steps", 40, 20), ("grace", 10, 5), ("num_samples", 8, 5),
                              ("lrs", "1e-5,1e-4,1e-3", "1e-4,1e-3")):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    args.ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    if args.eval_every > args.grace or args.grace >= args.max_steps:
        p.error(f"need eval_every <= grace < max_steps (got {args.eval_every}, {args.grace}, {args.max_steps})")
    return args


def study_config(args, out: Path, search: dict):
    from sar_ray.config import StudyConfig

    raw = {
        "name": out.name,
        "out": str(out),
        "model": {"pretrained": args.model},
        "data": {"path": "synthetic", "synthetic": {"n": args.images, "size": max(32, args.resolution), "seed": 0},
                 "resolution": args.resolution, "val_fraction": 0.15},
        "strategy": {"unet": {"mode": "lora", "rank": 4}, "text_encoder": {"mode": "frozen"}},
        "train": {"lr": 1e-4, "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": 0,
                  "eval_every": args.eval_every, "eval_batches": 2,
                  # One resume checkpoint, at the end: intermediate ones are not what is measured.
                  "checkpoint_every": args.max_steps, "log_every": 1},
        "sample": {"prompts": ["<SAR> image of a forest"], "seeds": [0], "steps": 1},
        "scaling": {"num_workers": 0, "cpus_per_worker": args.cpus_per_worker},
        "tracking": {"enabled": False},
        "search": {
            "space": {
                "strategy.unet.mode": {"grid": ["full", "lora"]},
                "strategy.unet.rank": {"choice": args.ranks},
                "train.lr": {"choice": args.lrs},
            },
            "objectives": [{"metric": "val_loss", "mode": "min"}],
            "evaluate": False,
            "max_failures": 0,
            **({"max_concurrent_trials": args.concurrency} if args.concurrency else {}),
            **search,
        },
    }
    return StudyConfig.model_validate(raw)


def probe_actor_start() -> tuple[float, float]:
    """(seconds until a new 1-CPU actor answers, seconds to import the trial's modules in it):
    what every Tune trial pays again when Tune starts a fresh actor for it."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def ping(self) -> float:
            return time.time()

        def imports(self) -> float:
            t = time.time()
            import sar_ray.train  # noqa: F401 - torch, diffusers, peft, ray.train
            import sar_ray.trial  # noqa: F401
            return time.time() - t

    t = time.time()
    a = Probe.remote()
    ready = ray.get(a.ping.remote()) - t
    imp = ray.get(a.imports.remote())
    ray.kill(a)
    return ready, imp


# --------------------------------------------------------------------------------------------
# reading a finished sweep
# --------------------------------------------------------------------------------------------


@dataclass
class TrialTimes:
    trial_id: str
    params: dict
    status: str  # what sar_ray's SweepResult says
    val_loss: float | None
    steps: int  # last optimizer step trained (train_log.jsonl)
    t_enter: float | None  # run_trial wrote config.yaml
    t_start: float | None  # "start" event: model built
    t_last: float | None  # last step / val_loss record
    t_end: float | None  # "end" event: weights saved, final samples written
    step_s: list[float] = field(default_factory=list)  # plain step durations
    val_s: float = 0.0  # time spent computing validation losses
    report_s: float = 0.0  # extra time on steps that follow a report (Tune round trip, checkpoint)

    @property
    def finished(self) -> bool:
        """Trained to train.max_steps: its val_loss is comparable with the grid's. (Whether it
        then saved its weights and samples is `t_end`; sar_ray's own status is `status`.)"""
        return self.steps >= ARGS.max_steps

    @property
    def busy(self) -> tuple[float, float] | None:
        end = self.t_end or self.t_last
        return (self.t_start, end) if self.t_start and end else None


def read_trial(folder: Path, row: dict) -> TrialTimes:
    from sar_ray.trial import read_log

    tdir = folder / "trials" / row["trial_id"]
    log = read_log(tdir / "train_log.jsonl")
    start = next((r["time"] for r in log if r.get("event") == "start"), None)
    end = next((r["time"] for r in log if r.get("event") == "end"), None)
    steps = [r for r in log if "loss" in r and "event" not in r]
    vals = [r for r in log if "val_loss" in r and "event" not in r]
    last = max((r["time"] for r in steps + vals), default=None)
    cfg_file = tdir / "config.yaml"
    t = TrialTimes(row["trial_id"], row["params"], row["status"], row["metrics"].get("val_loss"),
                   max((r["step"] for r in steps), default=int(row["metrics"].get("step", 0) or 0)),
                   cfg_file.stat().st_mtime if cfg_file.is_file() else None, start, last, end)
    # Step durations: gap between consecutive step records; a gap that contains a val_loss
    # record (and hence a Tune report) is split into validation and report overhead.
    step_time = {r["step"]: r["time"] for r in steps}
    val_time = {r["step"]: r["time"] for r in vals}
    plain = [step_time[s] - step_time[s - 1] for s in step_time if s - 1 in step_time and s - 1 not in val_time]
    med = statistics.median(plain) if plain else 0.0
    t.step_s = plain
    for s, tv in val_time.items():
        if s in step_time:
            t.val_s += tv - step_time[s]
        if s + 1 in step_time:
            t.report_s += max(0.0, step_time[s + 1] - tv - med)
    return t


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            if cur:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur else 0.0)


@dataclass
class SweepRun:
    label: str
    result: object
    t0: float
    t1: float
    concurrency: int
    trials: list[TrialTimes]

    @property
    def steps(self) -> int:
        return sum(t.steps for t in self.trials)


def run_one(label: str, study, concurrency: int) -> SweepRun:
    from sar_ray.sweep import run_sweep

    t0 = time.time()
    result = run_sweep(study, progress=False)
    t1 = time.time()
    trials = [read_trial(result.folder, row) for row in result.trials]
    return SweepRun(label, result, t0, t1, concurrency, trials)


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------


def _p(d: dict) -> str:
    mode = d.get("strategy.unet.mode")
    rank = f"{d['strategy.unet.rank']}" if mode == "lora" and "strategy.unet.rank" in d else ""
    return f"{mode}{rank} lr={d.get('train.lr'):.0e}"


def print_trials(s: SweepRun) -> None:
    print(f"\n[{s.label}] {len(s.trials)} trials, wall {s.result.wall_s:.1f} s, concurrency {s.concurrency}")
    for t in sorted(s.trials, key=lambda t: t.t_enter or 0):
        busy = t.busy
        mine = ("finished" if t.t_end else "trained") if t.finished else f"stopped@{t.steps}"
        flag = "" if (t.status == "DONE") == bool(t.finished and t.t_end) else f"  <- sar_ray says {t.status}"
        if t.finished and not t.t_end:
            flag += ", no final weights/samples"
        print(f"  {t.trial_id:<18} {_p(t.params):<18} {mine:<11} val_loss "
              f"{t.val_loss if t.val_loss is not None else float('nan'):.5f}  "
              f"busy {busy[1] - busy[0] if busy else float('nan'):5.1f} s{flag}")


def overhead(s: SweepRun, project_s: float) -> None:
    wall = s.result.wall_s
    busy = [t.busy for t in s.trials if t.busy]
    busy_sum = sum(b - a for a, b in busy)
    outside = 1 - busy_sum / (wall * s.concurrency)
    idle = 1 - union_length(busy) / wall
    order = sorted((t for t in s.trials if t.t_enter and t.busy), key=lambda t: t.t_enter)
    startup = order[0].t_enter - s.t0 if order else float("nan")
    launch = [t.t_start - t.t_enter for t in order]
    between = [b.t_enter - a.busy[1] for a, b in zip(order, order[1:])]
    tail = s.t1 - max(b for _, b in busy) if busy else float("nan")
    train = sum(sum(t.step_s) for t in s.trials)
    val = sum(t.val_s for t in s.trials)
    rep = sum(t.report_s for t in s.trials)
    fin = sum(t.t_end - t.t_last for t in s.trials if t.t_end and t.t_last)
    n_rep = sum(1 for t in s.trials for _ in range(t.steps // max(1, ARGS.eval_every)))
    med_step = statistics.median([x for t in s.trials for x in t.step_s] or [0.0])
    print(f"\n[{s.label}] outside training = 1 - sum(busy) / (wall x concurrency) "
          f"= 1 - {busy_sum:.1f} / ({wall:.1f} x {s.concurrency}) = {outside:.1%}   "
          f"(wall with no trial busy: {idle:.1%})")
    n = max(len(order), 1)
    print(f"  start-up {startup:6.1f} s | launch {sum(launch):6.1f} s ({sum(launch) / n:.1f}/trial) | "
          f"between {sum(between):6.1f} s ({sum(between) / max(len(between), 1):.1f}/gap) | tail {tail:5.1f} s")
    print(f"  inside busy {busy_sum:.1f} s: train steps {train:.1f} s (median step {med_step * 1000:.0f} ms), "
          f"validation {val:.1f} s, report round trips ~{rep:.1f} s (~{rep / max(n_rep, 1) * 1000:.0f} ms each), "
          f"finish (save + sample) {fin:.1f} s")
    per_trial_fixed = (startup + sum(launch) + sum(between) + tail) / n
    proj = per_trial_fixed / (per_trial_fixed + project_s) if s.concurrency == 1 else float("nan")
    print(f"  fixed cost outside training per trial ~{per_trial_fixed:.1f} s -> with {project_s:.0f} s of training "
          f"per trial (one at a time) outside would be ~{proj:.1%} (goal < {OUTSIDE_GOAL:.0%})")


ARGS: argparse.Namespace


def main(argv: list[str] | None = None) -> int:
    global ARGS
    ARGS = args = parse_args(argv)
    import ray

    from sar_ray.sweep import concurrent_trials, grid_points
    from sar_ray.train import connect_ray

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sweep_eff_"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("grid", "optuna"):
        shutil.rmtree(work / sub, ignore_errors=True)
    grid = study_config(args, work / "grid", {"algorithm": "grid", "scheduler": {"type": "none"}})
    search = study_config(args, work / "optuna", {
        "algorithm": "optuna", "seed": args.seed, "num_samples": args.num_samples,
        "scheduler": {"type": "asha", "metric": "val_loss", "mode": "min", "grace_period": args.grace,
                      "reduction_factor": 2}})
    n_grid = len(grid_points(grid.search, grid.trial()))
    print(f"sweep efficiency: {args.model} {args.resolution}px, {args.images} images, max_steps {args.max_steps}, "
          f"eval_every {args.eval_every}; grid {n_grid} points vs optuna {args.num_samples} trials + ASHA "
          f"(grace {args.grace}, rf 2); workdir {work}")

    t = time.time()
    # A private local Ray (address="local"): ray.init() with no address would join any Ray that
    # another process started on this machine with `ray start`.
    ray.init(address="local", num_cpus=args.cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")
    connect_ray(None)  # sar_ray's Ray Data settings (returns early: Ray is up)
    for name, level in (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR),
                        ("ray.train", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    t_init = time.time() - t
    conc = concurrent_trials(grid.trial(), grid.search, ray.cluster_resources())
    print(f"ray.init {t_init:.1f} s (once, outside both sweeps); cluster CPUs {ray.cluster_resources().get('CPU')}, "
          f"concurrent trials {conc}")

    if args.reuse_actors:
        import ray.tune

        ray.tune.TuneConfig = functools.partial(ray.tune.TuneConfig, reuse_actors=True)
        print("EXPERIMENT: Tune reuses trial actors (TuneConfig(reuse_actors=True) patched in)")
    ready, imp = probe_actor_start()
    print(f"probe: a new 1-CPU actor answers in {ready:.1f} s; importing sar_ray.train + sar_ray.trial in it "
          f"takes {imp:.1f} s" + ("" if args.reuse_actors else " (paid again by every trial: Tune starts a fresh actor "
                                  "per trial)"))

    runs: dict[str, SweepRun] = {}
    try:
        if args.only in ("grid", "both"):
            runs["grid"] = run_one("grid", grid, conc)
            print_trials(runs["grid"])
        if args.only in ("search", "both"):
            runs["search"] = run_one("optuna+asha", search, conc)
            print_trials(runs["search"])

        print("\n=== results ===")
        g, s = runs.get("grid"), runs.get("search")
        if g and s:
            ratio = s.steps / g.steps
            print(f"trial-steps: grid {g.steps}, optuna+asha {s.steps}; ratio {ratio:.1%} "
                  f"(goal <= {STEPS_GOAL:.0%}: {'met' if ratio <= STEPS_GOAL else 'NOT met'})")
            done = [t for t in g.trials if t.finished and t.val_loss is not None]
            gbest = min(done, key=lambda t: t.val_loss) if done else None
            sdone = [t for t in s.trials if t.finished and t.val_loss is not None]
            sbest = min(sdone, key=lambda t: t.val_loss) if sdone else None
            if gbest and sbest:
                sv = sbest.val_loss
                rel = (sv - gbest.val_loss) / abs(gbest.val_loss)
                print(f"best val_loss at step {args.max_steps}: grid {gbest.val_loss:.5f} ({_p(gbest.params)}), "
                      f"optuna+asha {sv:.5f} ({_p(sbest.params)}); relative {rel:+.2%}; within {BEST_TOL:.0%}: "
                      f"{'yes' if rel <= BEST_TOL else 'NO'}")
                lib = s.result.best
                if lib is None:
                    print(f"  NOTE: SweepResult.best is None: no search trial has sar_ray status DONE "
                          f"({sum(t.finished for t in s.trials)} trained to step {args.max_steps})")
                elif lib["trial_id"] != sbest.trial_id:
                    lt = next(t for t in s.trials if t.trial_id == lib["trial_id"])
                    print(f"  NOTE: SweepResult.best is {lib['trial_id']} ({_p(lt.params)}, val_loss "
                          f"{lib['metrics'].get('val_loss'):.5f} at step {lt.steps}), not a finished trial")
                rank = sorted(t.val_loss for t in done).index(
                    min((t.val_loss for t in done), key=lambda v: abs(v - sv))) + 1
                print(f"  the search's best is #{rank} of the grid's {len(done)} finished points")
            else:
                print("best val_loss: a sweep has no finished trial")
            # Same params, same seeds: the two sweeps should agree on every shared point.
            by = {json.dumps(t.params, sort_keys=True): t for t in g.trials}
            pairs = [(by[k], t) for t in s.trials if t.finished
                     and (k := json.dumps(t.params, sort_keys=True)) in by and by[k].val_loss is not None]
            if pairs:
                worst = max(abs(a.val_loss - b.val_loss) / abs(a.val_loss) for a, b in pairs)
                print(f"  consistency: {len(pairs)} finished search trials share params with the grid; "
                      f"max relative val_loss difference {worst:.2e}")
            seen = [json.dumps(t.params, sort_keys=True) for t in s.trials]
            dup = len(seen) - len(set(seen))
            note = (f"; optuna's TPE samples its first 10 trials at random, so all {args.num_samples} here are random"
                    if args.num_samples <= 10 else "")
            print(f"  distinct points sampled: {len(set(seen))} of {len(seen)} trials ({dup} repeats){note}")
        for r in runs.values():
            overhead(r, args.project_s)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
