"""`sar-ray` command line: parse, call library code, print, set the exit code.

Exit codes: 0 ok, 1 the run failed (NaN loss, a crashed worker), 2 bad input (config, data,
paths, unreachable services). Library code raises; only this module prints and exits.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UserError(Exception):
    """Bad input detected by the CLI itself (exit code 2)."""


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input is wrong" (exit 2), imported lazily so that
    `sar-ray --help` does not import torch."""
    from .config import ConfigError

    types: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError]
    try:
        from .data import DataError, ImageReadError

        types += [DataError, ImageReadError]
    except ImportError:  # pragma: no cover - data package always present once installed
        pass
    try:
        from .tracking import TrackingError

        types.append(TrackingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .train import RayConnectionError

        types.append(RayConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _failed_types() -> tuple[type[BaseException], ...]:
    try:
        from .train import TrainingError

        return (TrainingError,)
    except ImportError:  # pragma: no cover
        return ()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML, e.g. sweeps/quickstart.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set strategy.unet.mode=lora (repeatable)",
    )


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """--set values, then the flags `trial` and `sweep` share (--out, --tracking-uri) as overrides."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    return overrides


# ------------------------------------------------------------------------------------ trial


def _add_smoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="run the file's smoke twin on this machine (CPU, no network): a tiny model of the same "
                   "family, synthetic SAR, a local Ray and MLflow, at most 2 CPU workers, every step key scaled "
                   "to a few steps, at most 6 search points trying every axis value; precision, strategies, "
                   "search and evaluation as written. Prints what it replaced")
    p.add_argument("--smoke-dir", default="runs/smoke",
                   help="where --smoke writes (outputs, mlflow.db, tiny SAR-CLIP); an earlier smoke run of the "
                   "study there is replaced (default runs/smoke)")


def _smoke(study, args: argparse.Namespace):
    """The smoke twin of `study`, after printing what it replaced; it runs on a local Ray."""
    from pathlib import Path

    from .smoke import smoke_study

    os.environ.pop("RAY_ADDRESS", None)  # --address was replaced; RAY_ADDRESS must not win either
    smoked, replaced = smoke_study(study, Path(args.smoke_dir))
    for line in replaced:
        console.print(f"smoke: {line}", markup=False, soft_wrap=True)
    return smoked


def _cmd_trial(args: argparse.Namespace) -> int:
    from . import config, trial

    overrides = _flag_overrides(args)
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    study = config.load(args.config, overrides)
    fresh = args.fresh
    if args.smoke:
        # The base trial only: no search section, so no search points either.
        study = _smoke(study.model_copy(update={"search": None}), args)
        # Next to where a smoke sweep of the study goes, as a real trial goes next to its sweep.
        study = study.model_copy(update={"out": f"{study.out}/{study.strategy.slug}"})
        fresh = True  # a check runs from step 0 each time
    cfg = study.trial()
    if cfg.scaling.storage_path:  # unreachable storage: exit 2 before any compute
        trial.probe_storage(cfg.scaling.storage_path)
    result = trial.run_trial(cfg, fresh=fresh, progress=not args.quiet, console=console)
    console.print(trial.summary(result), soft_wrap=True)
    return EXIT_OK


def _add_trial(sub) -> None:
    p = sub.add_parser(
        "trial",
        help="run one fine-tuning trial locally (Ray Train)",
        description="Train one strategy on the study's base config, save diffusers-loadable "
        "outputs, generate samples, and log one MLflow run. Rerunning with the same output "
        "folder resumes from its newest checkpoint (use --fresh to start over).",
    )
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: runs/<name>/<strategy>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out and start over")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_smoke_args(p)
    p.set_defaults(func=_cmd_trial)


# ------------------------------------------------------------------------------------ sweep


def _cmd_sweep(args: argparse.Namespace) -> int:
    from . import config, sweep

    overrides = _flag_overrides(args)
    if args.address:
        overrides.append(f"scaling.address={args.address}")
    study = config.load(args.config, overrides)
    if args.smoke:
        from .smoke import clear_earlier_run

        study = _smoke(study, args)
        if not args.resume and clear_earlier_run(study):
            console.print(f"smoke: replaced the earlier smoke run in {study.out}", markup=False, soft_wrap=True)
    if args.fresh and args.resume:
        raise UserError("--fresh and --resume exclude each other: --fresh deletes what --resume would continue")
    if study.scaling.storage_path:  # unreachable storage: exit 2 before any trial starts
        from .trial import probe_storage

        probe_storage(study.scaling.storage_path)
    result = sweep.run_sweep(study, resume=args.resume, fresh=args.fresh, console=console, progress=not args.quiet)
    objective = study.search.objectives[0]
    console.print(sweep.summary(result, objective.metric, objective.mode), soft_wrap=True)
    if result.report and (result.report / "report.md").is_file():
        console.print((result.report / "report.md").read_text(), markup=False, soft_wrap=True)
    uri = study.tracking.resolved_uri()
    if not uri.startswith("http"):
        console.print(f"open the MLflow UI:  mlflow ui --backend-store-uri {uri}", markup=False, soft_wrap=True)
    failed = [t for t in result.trials if t["status"] == "ERROR"]
    if args.smoke:
        # A check: one failed trial fails it (and names why).
        for t in failed:
            err_console.print(f"smoke: trial {t['trial_id']} ({t['strategy']}) failed: {t['error']}",
                              markup=False, soft_wrap=True)
        return EXIT_FAILED if failed or not result.trials else EXIT_OK
    return EXIT_FAILED if failed and len(failed) == len(result.trials) else EXIT_OK


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a study: Ray Tune over Ray Train trials, tracked in MLflow",
        description="Search the study's `search.space` (Optuna TPE, grid or random; ASHA early stopping), "
        "train each trial like `sar-ray trial`, score its samples, log a parent MLflow run with one child "
        "per trial, and write the strategy comparison report.",
    )
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the cluster the last `ray start` here recorded if it answers, else a local Ray); e.g. auto")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept); "
                   "starts it when there is nothing to continue")
    p.add_argument("--fresh", action="store_true", help="delete an earlier sweep of this name (its folder's Tune state "
                   "and trials, its Train runs under scaling.storage_path) and start over")
    p.add_argument("--out", help="sweep folder (default: runs/<name>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("-q", "--quiet", action="store_true", help="no live trial table")
    _add_smoke_args(p)
    p.set_defaults(func=_cmd_sweep)


def _cmd_report(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .config import ObjectiveConfig, format_validation_error, objective_direction
    from .report import build_report
    from .tracking import Tracker, default_uri

    if args.mode and not args.metric:
        raise UserError("sar-ray report: --mode needs --metric (without both, the sweep's own objectives rank)")
    objective = None
    if args.metric:
        try:
            objective = ObjectiveConfig(metric=args.metric, mode=args.mode or objective_direction(args.metric))
        except ValidationError as e:
            raise UserError(format_validation_error(e, f"sar-ray report --metric {args.metric}",
                                                    ObjectiveConfig)) from None
    tracker = Tracker(default_uri(args.tracking_uri), args.experiment)
    try:
        out = build_report(tracker, args.run_id, args.out, objective=objective)
    except ValueError as e:
        raise UserError(str(e)) from None
    console.print((out / "report.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"report written to {out} and logged to the sweep's MLflow run", markup=False)
    return EXIT_OK


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="strategy comparison table and plots of a sweep",
        description="One row per strategy combination (its best trial), Markdown + CSV + plots, from the "
        "MLflow runs of a sweep; logged to the sweep's parent run.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep (tracking.experiment)")
    p.add_argument("--run-id", help="the sweep's parent run (default: the experiment's latest sweep)")
    p.add_argument("--out", default="report", help="output folder (default: report/)")
    p.add_argument("--metric", help="objective that picks each strategy's best trial (default: the sweep's "
                   "search.objectives, as its own report; e.g. val_loss)")
    p.add_argument("--mode", choices=["min", "max"], help="with --metric (default: the metric's own direction)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.set_defaults(func=_cmd_report)


# ------------------------------------------------------------------------------------ validate


def _cmd_validate(args: argparse.Namespace) -> int:
    from . import config

    study = config.load(args.config, args.overrides)
    cfg = study.trial()
    console.print(f"[green]ok[/green] {args.config}: strategy {cfg.strategy.slug}, model {cfg.model.pretrained}, "
                  f"data {cfg.data.path} @ {cfg.data.resolution} px, {cfg.train.max_steps} steps, "
                  f"{cfg.scaling.num_workers} workers")
    if study.search is not None:
        from .sweep import check_search

        trials, dropped = check_search(study)
        left = f" ({dropped} point{'s' * (dropped != 1)} that would train nothing left out)" if dropped else ""
        n = study.search.repeats
        seeds = f" ({trials // n} points x {n} seeds)" if n > 1 else ""
        console.print(f"search: {study.search.algorithm}, {trials} trials{seeds}{left}")
    if args.print:
        console.print(config.dump_yaml(study), markup=False)
    if args.plan:
        from rich.table import Table

        from . import plan

        memory = plan.plan_study(study)
        header, rows = memory.table()
        table = Table()
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(f"GPU memory per worker in GB, model {memory.note}", markup=False, soft_wrap=True)
        # As wide as the table needs: a narrow or piped console must not cut the slugs short.
        needed = console.measure(table, options=console.options.update_width(1000)).maximum
        Console(width=max(console.width, needed), highlight=False).print(table)
        console.print("lower bound = weights + grads + optimizer + sync buffer (+ EMA); activations are an "
                      f"estimate (batch {cfg.train.batch_size} @ {cfg.data.resolution} px, "
                      f"{cfg.train.mixed_precision} autocast, checkpointing {cfg.train.gradient_checkpointing})",
                      markup=False, soft_wrap=True)
        for line in memory.warnings():
            console.print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)
        refusal = memory.refusal()
        if refusal:
            raise config.ConfigError(f"{args.config}: {refusal}")
    return EXIT_OK


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check a study file without running anything",
        description="Load and validate a study YAML (and --set overrides); print the resolved config with --print, "
        "the memory each strategy needs per worker with --plan.",
    )
    _add_config_args(p)
    p.add_argument("--print", action="store_true", help="print the fully resolved config")
    p.add_argument("--plan", action="store_true",
                   help="per strategy of the study: trainable parameters and GPU memory per worker (weights, "
                   "gradients, optimizer, sync buffer, estimated activations); exit 2 where the lower bound "
                   "exceeds scaling.gpu_memory_gb")
    p.set_defaults(func=_cmd_validate)


# ------------------------------------------------------------------------------------ data


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from .data import write_synthetic

    if args.n <= 0 or args.size < 16 or args.looks <= 0:
        raise UserError(f"data synth: need --n > 0, --size >= 16, --looks > 0 (got n={args.n}, size={args.size}, looks={args.looks})")
    path = write_synthetic(args.out, n=args.n, size=args.size, seed=args.seed, looks=args.looks, fmt=args.format)
    console.print(f"wrote {args.n} synthetic SAR scenes ({args.size} px, {args.looks}-look speckle) to {path}")
    return EXIT_OK


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser(
        "synth",
        help="write synthetic SAR scenes (imagefolder + metadata.jsonl)",
        description="Synthetic SAR scenes (water, fields, forest, urban, ships, vehicles) with "
        "L-look Gamma speckle and captions naming their content. Deterministic per seed.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=500, help="number of scenes (default 500)")
    s.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--looks", type=int, default=4, help="number of looks L of the speckle (default 4)")
    s.add_argument("--format", choices=["png", "tiff"], default="png", help="16-bit PNG or float32 TIFF amplitude")
    s.set_defaults(func=_cmd_data_synth)
    i = dsub.add_parser(
        "inspect",
        help="counts, members/columns, caption keys, image sizes and amplitude statistics of a dataset",
        description="Look at a dataset before training on it: a folder, a caption table, WebDataset "
        "shards (one .tar, a folder, a brace pattern, an s3:// prefix). Counts and member names come "
        "from every file (tar headers and JSON only); sizes, dtypes and amplitude statistics from a "
        "seeded sample of images. Exit 2 with one line on unusable input.",
    )
    i.add_argument("path", help="e.g. '/data/sarlo80/shard-{000000..000519}.tar' (quote the braces)")
    i.add_argument("--sample", type=int, default=64, help="images decoded for sizes and amplitude statistics (default 64)")
    i.add_argument("--seed", type=int, default=0, help="seed of the sample")
    i.add_argument("--image-column", help="image member / column (default: an .npy, else .png/.tif member; a table's bytes column)")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    i.set_defaults(func=_cmd_data_inspect)
    c = dsub.add_parser(
        "cache",
        help="encode the study's training images once with its frozen VAE encoder, and its captions once "
        "with its frozen text encoders (the latent and text caches)",
        description="Build the shared caches of the study's base trial ahead of `sar-ray trial` / "
        "`sweep` (which otherwise build them on first use): Ray Data jobs store each image's VAE posterior "
        "under scaling.storage_path/latents (else .sar-ray-cache/latents) and each caption's text encoder "
        "output under scaling.storage_path/text (else .sar-ray-cache/text). Trials read them with data.cache: auto. "
        "A half that no point of the search space reads (every VAE tuned; a text encoder tuned or the token learned "
        "in every point) is not built.",
    )
    _add_config_args(c)
    c.set_defaults(func=_cmd_data_cache)


def _cmd_data_cache(args: argparse.Namespace) -> int:
    from . import config
    from .data import build_datasets
    from .data.cache import build, build_text, cache_root, halves, open_latents
    from .sweep import search_configs
    from .train import connect_ray

    study = config.load(args.config, list(args.overrides))
    cfg = study.trial()
    # Only the halves some trial of the search reads (a frozen VAE; frozen text encoders and no
    # learned token), whatever data.cache says: the user asked for them.
    latents, text = halves(search_configs(study))
    connect_ray(cfg.scaling.address)
    data = build_datasets(cfg.data, cfg.train.seed)
    if latents:
        key, marker, built = build(cfg, data)
        console.print(f"latent cache {cache_root(cfg)[1]}/{key}: {marker['n_train']} train + {marker['n_val']} val "
                      f"images ({'built' if built else 'already built; reused'})", markup=False, soft_wrap=True)
        data = open_latents(cfg, data, key, marker)  # the captions come from the cached rows (no pixel pass)
    else:
        console.print("latent cache: not built (every trial of the search tunes the VAE, which trains on pixels)",
                      markup=False, soft_wrap=True)
    if not text:
        console.print("text cache: not built (every trial of the search tunes a text encoder or learns the token)",
                      markup=False, soft_wrap=True)
    else:
        tkey, tmarker, tbuilt = build_text(cfg, data)
        if tmarker.get("skipped"):
            console.print(f"text cache: not built ({tmarker['skipped']})", markup=False, soft_wrap=True)
        else:
            console.print(f"text cache {cache_root(cfg, 'text')[1]}/{tkey}: {tmarker['n_captions']} captions "
                          f"({'built' if tbuilt else 'already built; reused'})", markup=False, soft_wrap=True)
    if cfg.data.cache != "auto":
        console.print("note: data.cache is off in this study; set data.cache: auto for trials to read it",
                      markup=False, soft_wrap=True)
    return EXIT_OK


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from .data.inspect import inspect_data

    info = inspect_data(args.path, sample=args.sample, seed=args.seed, image_column=args.image_column)
    if args.json:
        print(json.dumps(info.__dict__, indent=2))
        return EXIT_OK
    console.print(f"{info.path}: {info.kind}, {info.count} samples in {info.files} file(s)")
    console.print("members / columns: " + ", ".join(f"{k} ({v})" for k, v in info.members.items()))
    for member, shapes in info.shapes.items():
        console.print(f"images ({member}, {info.sampled} sampled): " + ", ".join(f"{k} ({v})" for k, v in shapes.items()))
    if info.caption_keys:
        t = Table(title="caption keys (length in words)")
        for col in ("key", "n", "min", "mean", "max"):
            t.add_column(col, justify="left" if col == "key" else "right")
        for k, st in info.caption_keys.items():
            t.add_row(k, str(st["n"]), str(st["min"]), f"{st['mean']:.1f}", str(st["max"]))
        console.print(t)
    if info.amplitude:
        console.print(f"amplitude ({info.amplitude_member}, linear, before normalisation): "
                      + ", ".join(f"{k} {v:.4g}" for k, v in info.amplitude.items()))
    for p in info.problems[:5]:
        console.print(f"[yellow]unreadable:[/yellow] {p}", markup=True)
    for note in info.notes:
        console.print(f"[yellow]note:[/yellow] {note}", markup=True)
    return EXIT_OK


# ------------------------------------------------------------------------------------ evaluate
# (metrics: `sar-ray evaluate` and `sar-ray clip train`)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from rich.table import Table

    from . import config
    from .evaluate import evaluate, metric_direction
    from .metrics.clip import ClipError

    # Base: the study's eval section (normalised like its training data) or the defaults;
    # then the flags given on the command line.
    raw: dict = {}
    if args.config:
        study = config.load(args.config, args.overrides)
        raw = study.eval.model_dump()
        if "normalization" not in study.eval.model_fields_set:
            raw["normalization"] = study.data.normalization.model_dump()
    elif args.overrides:
        raise UserError("--set needs --config (the study file whose eval section it changes)")
    flags = {
        "metrics": [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        "clip": args.clip,
        "size": args.size,
        "max_images": args.max_images,
        "glcm_levels": args.glcm_levels,
        "batch_size": args.batch_size,
        "bootstrap": args.bootstrap,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.clip and args.metrics is None and "clip" not in raw.get("metrics", ["stats", "glcm"]):
        raw["metrics"] = list(raw.get("metrics", ["stats", "glcm"])) + ["clip"]
    if args.normalization:
        raw["normalization"] = {**raw.get("normalization", {}), "method": args.normalization}
    if args.normalize_generated:
        raw["generated_normalized"] = False
    elif args.generated_is_model_output:
        raw["generated_normalized"] = True
    try:
        cfg = config.EvalConfig.model_validate(raw)
    except ValidationError as e:
        raise config.ConfigError(config.format_validation_error(e, "sar-ray evaluate", config.EvalConfig)) from None

    try:
        columns = (study.data.image_column, study.data.text_column) if args.config else None  # WebDataset members
        result = evaluate(args.generated, args.reference, cfg, out=args.out, progress=not args.quiet,
                          reference_columns=columns)
    except ClipError as e:
        raise UserError(str(e)) from None

    gen, ref = result.normalization["generated"], result.normalization["reference"]
    table = Table(title=f"{result.n_generated} generated vs {result.n_reference} reference images "
                  f"at {result.size[0]}x{result.size[1]}",
                  caption=f"generated: {gen['as']}, {gen['why']}; reference: normalisation {ref['method']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result.intervals:
        table.add_column("95% interval", justify="right")
    table.add_column("better", justify="center")
    for name, value in result.metrics.items():
        arrow = "lower" if metric_direction(name) == "min" else "higher"
        lo, hi = result.intervals.get(name, (math.nan, math.nan))
        ci = [f"[{lo:.4g}, {hi:.4g}]" if math.isfinite(lo) else "-"] if result.intervals else []
        table.add_row(name, f"{value:.6g}", *ci, arrow)
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if result.metrics_path:
        console.print(f"wrote {result.metrics_path} and {result.per_image_path}")
    else:
        console.print("not saved (use --out runs/x/metrics.json to write metrics.json + per-image Parquet)")
    return EXIT_OK


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score generated SAR images against real ones",
        description="Amplitude statistics (KL, JS, Wasserstein, KS, ENL / CV / log-cumulant gaps), "
        "GLCM texture distances and SAR-CLIP alignment of a generated set against a reference "
        "set, computed with Ray Data. Prints a table; with --out writes metrics.json and a "
        "per-image Parquet file. Sets are folders of images (with metadata.jsonl for prompts and "
        "labels) or CSV/Parquet caption tables.",
    )
    p.add_argument("--generated", required=True, help="generated samples (folder with metadata.jsonl, or a table)")
    p.add_argument("--reference", required=True, help="real SAR images (folder, caption table, or WebDataset "
                   "shards: .tar, folder, brace pattern, s3:// prefix; --config names their image member and caption)")
    p.add_argument("--out", help="metrics.json path (or a folder); the per-image Parquet goes next to it")
    p.add_argument("--metrics", help="comma-separated families: stats,glcm,clip (default stats,glcm; "
                   "clip added when --clip is given)")
    p.add_argument("--clip", help="SAR-CLIP folder from `sar-ray clip train`")
    p.add_argument("--config", help="study YAML: use its eval section and data.normalization")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study value with --config, e.g. --set eval.glcm_levels=32")
    p.add_argument("--normalization", choices=["reference", "db", "percentile", "none"],
                   help="normalisation of the reference images (default: the study's, else reference)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--normalize-generated", action="store_true",
                     help="normalise the generated images like the reference (they are not model "
                     "output in [0, 1], e.g. a second folder of real SAR). Default: only sample folders "
                     "written by sar-ray (with samples.json) count as model output")
    how.add_argument("--generated-is-model-output", action="store_true",
                     help="the generated images are model output already in [0, 1] amplitude: only "
                     "rescale them (for samples written by another tool)")
    p.add_argument("--bootstrap", type=int, metavar="N",
                   help="bootstrap resamples for the 95%% intervals (default 200; 0: none)")
    p.add_argument("--size", type=int, help="compare at SIZE x SIZE (default: the first reference image's size)")
    p.add_argument("--max-images", type=int, help="use at most this many images per set")
    p.add_argument("--glcm-levels", type=int, help="GLCM grey levels (2..256, default 64)")
    p.add_argument("--batch-size", type=int, help="images per Ray Data batch (default 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_clip_train(args: argparse.Namespace) -> int:
    from . import config
    from .metrics.clip import ClipError, train_clip

    def on_epoch(epoch: int, loss: float) -> None:
        if not args.quiet:
            console.print(f"epoch {epoch}/{args.epochs}  contrastive loss {loss:.4f}")

    # Base: the study's data section (what its trials read) and train.seed, or the defaults;
    # then the flags.
    if args.config:
        study = config.load(args.config, args.overrides)
        data, seed = study.data, study.train.seed
    elif args.overrides:
        raise UserError("--set needs --config (the study file whose data section it changes)")
    else:
        data, seed = config.DataConfig(), 0
        if not args.data:
            raise UserError("clip train: give --data (a folder, caption table, WebDataset shards or `synthetic`) "
                            "or --config STUDY.yaml")
    if args.seed is not None:
        seed = args.seed
    text_column = data.text_column
    if args.text_column:
        names = [n.strip() for flag in args.text_column for n in flag.split(",")]
        if not all(names):
            raise UserError(f"--text-column: empty column name in {', '.join(map(repr, args.text_column))}")
        text_column = names[0] if len(names) == 1 else names
    normalization = data.normalization
    if args.normalization:
        normalization = normalization.model_copy(update={"method": args.normalization})

    try:
        result = train_clip(
            args.data or data.path, args.out, arch=args.arch, pretrained=args.pretrained, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, seed=seed, val_fraction=args.val_fraction,
            normalization=normalization, captions=data.captions, image_column=args.image_column or data.image_column,
            text_column=text_column, synthetic=data.synthetic, max_images=args.max_images, on_corrupt=data.on_corrupt,
            strip_prefix=None if args.keep_prefix else "<SAR>", num_workers=args.workers,
            device=args.device, on_epoch=on_epoch,
        )
    except ClipError as e:
        raise UserError(str(e)) from None
    val = (f"held-out retrieval top-1 {result.val_retrieval_top1:.3f} (chance {result.val_chance:.3f}, "
           f"{result.n_val} images)" if result.n_val and result.val_chance == result.val_chance
           else "no held-out retrieval (fewer than 2 distinct held-out captions)")
    console.print(f"[green]saved[/green] SAR-CLIP {result.arch} to {result.path}: {result.n_train} training "
                  f"images, {result.steps} steps in {result.seconds:.0f} s; {val}")
    return EXIT_OK


def _add_clip(sub) -> None:
    p = sub.add_parser("clip", help="SAR-CLIP evaluator")
    csub = p.add_subparsers(dest="clip_cmd", required=True)
    t = csub.add_parser(
        "train",
        help="fine-tune an open_clip model on SAR image-caption pairs",
        description="Contrastive fine-tuning of any open_clip architecture (random init, or "
        "--pretrained local weights; nothing is downloaded) on the same data readers and "
        "normalisation as training: caption tables, or WebDataset shards (SARLO-80: --image-column "
        "sar.npy, a complex SLC read as amplitude, --text-column caption.MID, a dotted path into "
        "KEY.meta.json). Saves open_clip_config.json + open_clip_model.safetensors "
        "(loadable with open_clip.create_model('local-dir:OUT')) and reports held-out "
        "prompt-retrieval accuracy.",
    )
    t.add_argument("--data", help="folder with metadata.jsonl, a CSV/Parquet caption table, WebDataset "
                   "shards (a .tar, a folder of them, a brace pattern such as 'shard-{000000..000009}.tar'), "
                   "or `synthetic` (default with --config: the study's data.path)")
    t.add_argument("--config", help="study YAML: train on its data (data.path, captions, image_column, "
                   "text_column, normalization, synthetic, on_corrupt) with its train.seed; the flags below win")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study value with --config, e.g. --set data.text_column=caption")
    t.add_argument("--image-column", help="column holding the image path or bytes, or the shards' image "
                   "member such as sar.npy (default: the study's data.image_column, else file_name)")
    t.add_argument("--text-column", action="append", metavar="NAME[,NAME...]",
                   help="caption column, or for shards a JSON path such as caption.MID (default: the study's "
                   "data.text_column, else text); several (repeat "
                   "the flag or separate with commas): each image trains on one of them per epoch, as in "
                   "diffusion training, and held-out retrieval uses its fixed one")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--arch", default="tiny", help="tiny, small, or an open_clip model name such as ViT-B-32 (default tiny)")
    t.add_argument("--pretrained", help="local weights file (or folder) to start from")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, help="init, batch order and per-epoch caption choice (default: "
                   "the study's train.seed with --config, else 0)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (by file hash, as training)")
    t.add_argument("--max-images", type=int, help="use at most this many images")
    t.add_argument("--normalization", choices=["reference", "db", "percentile", "none"],
                   help="SAR normalisation method (default: the study's data.normalization, else reference)")
    t.add_argument("--keep-prefix", action="store_true", help="keep a leading <SAR> token in captions")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    t.add_argument("-q", "--quiet", action="store_true", help="no per-epoch lines")
    t.set_defaults(func=_cmd_clip_train)


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sar-ray",
        description="Find the best way to fine-tune Stable Diffusion / SDXL for SAR images, with Ray and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"sar-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_trial(sub)
    _add_sweep(sub)
    _add_report(sub)
    _add_validate(sub)
    _add_data(sub)
    _add_evaluate(sub)
    _add_clip(sub)
    return parser


def _quiet_libraries() -> None:
    """The CLI shows its own progress; silence the libraries' INFO chatter and bars."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # "Loading weights" bars of from_pretrained
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing; we show our table
    for name in ("mlflow", "alembic", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted; outputs and checkpoints written so far are kept")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if os.environ.get("SAR_RAY_DEBUG"):
            raise
        if isinstance(e, _bad_input_types()):
            _print_error("error", str(e))
            return EXIT_BAD_INPUT
        if isinstance(e, _failed_types()):
            _print_error("failed", str(e))
            return EXIT_FAILED
        _print_error("failed", f"{type(e).__name__}: {e} (set SAR_RAY_DEBUG=1 for the traceback)")
        return EXIT_FAILED


def _print_error(kind: str, message: str) -> None:
    # soft_wrap: one logical line per error, whatever the terminal width; markup off so that
    # brackets in paths and messages print as they are.
    err_console.print(f"[red]{kind}:[/red] ", end="")
    err_console.print(message, markup=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
