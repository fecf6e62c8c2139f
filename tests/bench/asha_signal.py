"""Which rung signal should ASHA rank on: the validation loss or a quick realism metric?

    python tests/bench/asha_signal.py                       # 8-point grid, 24 steps: ~5-10 min on 2 cores
    python tests/bench/asha_signal.py --lrs 1e-5 1e-4 1e-3 3e-3 --max-steps 48 --every 8 --workdir /tmp/as

One grid sweep (scheduler none: every trial to the end, each scored on the final objective
like any sweep trial) of tiny-sd on synthetic SAR over strategy.unet.mode x train.lr, with
validation loss and samples every `--every` steps, so every trial's log holds both rung
signals at every rung: `val_loss` and `quick/<metric>` (amplitude distance of that step's
validation samples to the validation images). ASHA is then replayed on each signal from the
logs (successive halving: at each rung grace * factor**k keep the best 1/factor of the trials
still running, by that signal; the same rungs and factor sar-ray gives ASHA), so both signals
are judged on the very same trials:

  found best   whether the trials the replay lets finish include the grid's best trial on the
               final objective (and the final objective of the best survivor vs the grid best)
  trial-steps  the sum over trials of the steps trained before being stopped / grid's sum

Replaying synchronous halving instead of running Tune twice removes the run-to-run noise of
async ASHA on a busy machine (which trials happen to reach a rung first); a trial's curve does
not depend on the scheduler, so the replay sees what ASHA would. Exits 0 either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path


def replay(curves: dict[str, dict[int, float]], rungs: list[int], factor: float, max_steps: int) -> tuple[set, int]:
    """(trials left running after the last rung, total steps trained) for successive halving
    on `curves` (trial -> {step: signal}, lower is better)."""
    alive = set(curves)
    steps = 0
    last = 0
    for r in rungs:
        steps += (r - last) * len(alive)
        last = r
        scored = sorted(alive, key=lambda t: curves[t].get(r, math.inf))
        keep = max(1, int(len(scored) / factor))
        alive = set(scored[:keep])
    steps += (max_steps - last) * len(alive)
    return alive, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 3e-3])
    ap.add_argument("--max-steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6, help="eval and sample cadence = ASHA grace period")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--objective", default="stats/wasserstein")
    ap.add_argument("--quick", default="quick/stats/wasserstein")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from sar_ray import config
    from sar_ray.sweep import run_sweep
    from sar_ray.trial import read_log

    work = Path(args.workdir or tempfile.mkdtemp(prefix="asha-signal-"))
    space = {"strategy.unet.mode": {"grid": ["full", "lora"]}, "train.lr": {"grid": args.lrs}}
    study = config.load(None, [
        "name=asha-signal", f"out={work / 'out'}", "model.pretrained=tiny-sd", "data.synthetic.n=48",
        "data.synthetic.size=32", "data.resolution=32", "train.batch_size=4", "train.eval_batches=2",
        f"train.max_steps={args.max_steps}", f"train.eval_every={args.every}", f"train.sample_every={args.every}",
        f"train.checkpoint_every={args.max_steps}", 'sample.prompts=["<SAR> image of open water with a ship", '
        '"<SAR> image of a forest"]', "sample.seeds=[0,1]", "sample.steps=4", "tracking.enabled=false",
        "eval.bootstrap=0", "search.anchors=false",
        "search=" + json.dumps({"algorithm": "grid", "space": space, "scheduler": {"type": "none"},
                                "objectives": [{"metric": args.objective, "mode": "min"}], "evaluate": True}),
    ])
    r = run_sweep(study, progress=False)
    final, signals = {}, {"val_loss": {}, args.quick: {}}
    for t in r.trials:
        if t["status"] != "DONE" or args.objective not in t["metrics"]:
            continue
        final[t["trial_id"]] = t["metrics"][args.objective]
        log = read_log(r.folder / "trials" / t["trial_id"] / "train_log.jsonl")
        for key, curve in signals.items():
            curve[t["trial_id"]] = {rec["step"]: rec[key] for rec in log if key in rec}
    if len(final) < 2:
        raise SystemExit(f"only {len(final)} trials finished with {args.objective}: nothing to compare")
    rungs = [int(r) for r in config.asha_rungs(args.every, args.factor, args.max_steps)]  # sar-ray's ASHA rungs
    best = min(final, key=final.get)
    grid_steps = args.max_steps * len(final)
    print(f"{len(final)} trials, final {args.objective}: best {best} = {final[best]:.4g}, "
          f"worst {max(final.values()):.4g}; rungs {rungs}, factor {args.factor:g}")
    print(f"{'signal':28s} {'found best':>10s} {'survivor best':>14s} {'trial-steps':>12s}")
    for key, curves in signals.items():
        alive, steps = replay({t: c for t, c in curves.items() if t in final}, rungs, args.factor, args.max_steps)
        got = min(final[t] for t in alive)
        print(f"{key:28s} {str(best in alive):>10s} {got:14.4g} {steps / grid_steps:12.2f}")
    print(f"outputs: {work}")


if __name__ == "__main__":
    main()
