"""One trial, driver side: data, Ray Train fit, MLflow run, progress.

`run_trial` is the single path that trains a strategy: `sar-ray trial` calls it directly and a
sweep's Tune trial calls it with Tune's report callback, so a trial behaves the same alone and
inside a study.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_mod
from .config import TrialConfig
from .train import (CHECKPOINTS_DIR, DRIVER_MARK, LOG_FILE, WEIGHTS_DIR, TrainingError, build_trainer,
                    connect_ray, fetch_outputs)
from .train import run_name as train_run_name


@dataclass
class TrialResult:
    name: str
    strategy: str
    out: Path
    weights: Path
    samples: Path
    step: int
    loss: float | None
    val_loss: float | None
    wall_s: float
    n_train: int
    n_val: int
    n_skipped: int
    trainable_params: int | None = None
    counts_exact: bool = True  # False: n_train / n_val are upper bounds (see TrainData.counts_exact)
    peak_memory_mb: float | None = None
    gpu_hours: float = 0.0
    run_id: str | None = None
    run_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def cost(self) -> dict[str, float]:
        """What the trial cost: wall time, GPU-hours, peak memory, trainable parameters."""
        out = {"wall_s": self.wall_s, "gpu_hours": self.gpu_hours}
        if self.peak_memory_mb is not None:
            out["peak_memory_mb"] = self.peak_memory_mb
        if self.trainable_params is not None:
            out["trainable_params"] = float(self.trainable_params)
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out", "weights", "samples"):
            d[k] = str(d[k])
        return d


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
    return records


class TrialMonitor:
    """The driver's view of a running trial. Drains the workers' `ProgressChannel` (no
    filesystem shared with them is needed) and fans each record out: `train_log.jsonl` in
    the trial folder (a resumed run's history after its checkpoint is dropped), the progress
    bar, MLflow metrics (batched, every 2 s, off the progress path) and intermediate sample
    grids (MLflow images at their step). Works the same in local mode and with workers."""

    METRICS = {"loss": "train/loss", "lr": "train/lr", "images_per_s": "train/images_per_s",
               "vae_loss": "train/vae_loss", "val_loss": "val/loss"}
    MAX_PENDING = 100_000  # metric points held while MLflow does not take them
    CHUNK = 1000  # metric points a flush sends at a time (MLflow's log_batch cap)
    RETRY_S = 0.5  # between flushes that MLflow fails while a report waits

    def __init__(self, out: Path, tracker=None, run_id: str | None = None, bar=None, interval: float = 0.5):
        import ray

        from .train import ProgressChannel

        self.out, self.tracker, self.run_id, self.bar, self.interval = out, tracker, run_id, bar, interval
        # Pinned to the driver's node (it needs no CPU, so that node always fits it): it lives
        # and dies with this trial's driver, never with a worker node that is lost.
        self.channel = ProgressChannel.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)).remote()
        self.state: dict[str, Any] = {"step": 0, "loss": None, "val_loss": None, "trainable_params": None,
                                      "peak_memory_mb": None}
        self._received = 0  # records read from the channel (their numbers there: 0 .. this - 1)
        self._pending: list[tuple[str, float, int]] = []
        self._grids: list[tuple[bytes, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last_flush = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read what is left (the loop flushed it before returning) and write it out."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        import ray

        try:
            self.poll()
        except ray.exceptions.RayError:  # the channel is gone: the records are lost, the trial's results stand
            pass
        self.flush()
        ray.kill(self.channel)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(wait=self.interval)  # returns at once when a record or a settle comes
                if time.monotonic() - self._last_flush > 2.0:
                    self.flush()
            except Exception:  # noqa: BLE001 - a hiccup of the channel or the store must not stop training
                self._stop.wait(self.interval)

    # -- records ------------------------------------------------------------------------------
    def poll(self, wait: float = 0.0) -> None:
        """Write out what the channel holds. When rank 0 waits to report (`ProgressChannel.settle`),
        MLflow gets it now too, and the channel hears it is written: the scheduler may stop the
        trial on that report, which ends this driver."""
        import ray

        with self._lock:  # the thread and stop() may both poll
            records, settling = ray.get(self.channel.drain.remote(self._received, wait), timeout=30 + wait)
            self._received += len(records)
            for rec in records:
                try:
                    self.on_record(rec)
                except Exception:  # noqa: BLE001 - progress must never kill training
                    pass
            if settling:
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - as above; rank 0 stops waiting at its timeout
                    self._stop.wait(self.RETRY_S)  # the store is down: retry, not in a hot loop
                    return
                self.channel.written.remote(self._received)

    def on_record(self, rec: dict) -> None:
        event, step = rec.get("event"), int(rec.get("step") or 0)
        if event == "samples":
            self._grids.append((rec.pop("grid_png"), step))
            self._write(rec)
            return
        if event == "resumed":
            self._truncate(step)  # the run rewrites its history after the checkpoint
            if self.bar is not None:
                self.bar.note(f"resumed from checkpoint at step {step}")
        elif event == "start":
            self.state["trainable_params"] = rec.get("trainable_params")
            if step == 0:
                self._truncate(-1)  # a fresh start: no history
        elif event == "end":
            self.state["peak_memory_mb"] = rec.get("peak_memory_mb")
            if rec.get("vae_encoder_calls") is not None:  # rank 0's count (zero when the latent cache fed it)
                self._pending.append(("data/vae_encoder_calls", rec["vae_encoder_calls"], step))
            if rec.get("text_encoder_calls") is not None:  # rank 0's, in its steps (zero when the text cache fed them)
                self._pending.append(("data/text_encoder_calls", rec["text_encoder_calls"], step))
        elif event == "published":  # rank 0 ran where the trial folder is not: fetch its outputs
            self.state["published"] = rec["uri"]
        self._write(rec)
        if event:
            return
        self._pending.extend((name, rec[k], step) for k, name in self.METRICS.items() if k in rec)
        self._pending.extend((k, v, step) for k, v in rec.items() if k.startswith("quick/"))  # rung realism
        if "loss" in rec:
            self.state["step"], self.state["loss"] = step, rec["loss"]
        if "val_loss" in rec:
            self.state["val_loss"] = rec["val_loss"]
        if self.bar is not None:
            self.bar.update(self.state)

    def flush(self) -> None:
        """MLflow writes: metrics in one batch, then any new sample grids."""
        self._last_flush = time.monotonic()
        if self.tracker is None:
            self._pending, self._grids = [], []
            return
        batch, self._pending = self._pending, []
        grids, self._grids = self._grids, []
        for i in range(0, len(batch), self.CHUNK):
            try:
                self.tracker.log_metrics(self.run_id, batch[i : i + self.CHUNK])
            except Exception:
                # What was not sent is kept for the next flush (a report settling waits for
                # it); a store down for long keeps the newest.
                self._pending = (batch[i:] + self._pending)[-self.MAX_PENDING:]
                self._grids = grids + self._grids
                raise
        for png, step in grids:
            self.tracker.log_image(self.run_id, png, "samples", step)

    # -- train_log.jsonl ---------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE

    def _write(self, rec: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _truncate(self, step: int) -> None:
        """Keep only the lines up to `step` (-1: none)."""
        if not self.log_path.is_file():
            return
        keep = [r for r in read_log(self.log_path) if int(r.get("step") or 0) <= step] if step >= 0 else []
        self.log_path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _clean(out: Path) -> None:
    for name in (CHECKPOINTS_DIR, "ray", WEIGHTS_DIR, "samples", LOG_FILE, "summary.json", "mlflow_run.json", DRIVER_MARK,
                 "diverged.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def storage_filesystem(storage_path: str):
    """(pyarrow filesystem, root path) of `scaling.storage_path`: a URI (`s3://`, `gs://`,
    `file://`) through pyarrow's filesystems, a plain path as a local folder."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(storage_path)
    except (pafs.ArrowInvalid, ValueError):  # a plain local path
        return pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())


def clear_run_storage(storage_path: str, name: str) -> None:
    """Delete the Ray Train run `name` under `storage_path` (a local folder, or object storage
    such as `s3://` through pyarrow's filesystems), so that `--fresh` cannot resume from it."""
    import pyarrow.fs as pafs

    fs, root = storage_filesystem(storage_path)
    target = f"{root.rstrip('/')}/{name}"
    try:
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            fs.delete_dir(target)
    except OSError as e:
        raise config_mod.ConfigError(
            f"scaling.storage_path={storage_path!r}: cannot clear {target} for --fresh ({e}); check the address "
            f"and credentials, or drop --fresh") from None


def probe_storage(storage_path: str, timeout: float = 20.0) -> None:
    """Write and delete a tiny marker under `storage_path` before any compute, so that an
    unreachable endpoint, a missing bucket or a folder that cannot be written is refused with
    one line instead of failing the first checkpoint (or, for a black-holed endpoint, hanging).
    `timeout`: seconds the whole probe may take (pyarrow calls cannot be cancelled; the probe
    runs in a daemon thread)."""
    import uuid

    def probe() -> None:
        import pyarrow.fs as pafs

        fs, root = storage_filesystem(storage_path)
        root = root.rstrip("/")
        if isinstance(fs, pafs.S3FileSystem):  # the same settings, but no minutes of retries
            options = fs.__reduce__()[1][0]
            fs = pafs.S3FileSystem(**{**options, "connect_timeout": min(5.0, timeout), "request_timeout": timeout,
                                      "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)})
        try:
            fs.create_dir(root, recursive=True)
        except OSError:  # object storage: a bucket prefix needs no folder; the write below says
            pass
        marker = f"{root}/.sar_ray_probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(marker) as f:
            f.write(b"sar-ray storage probe\n")
        fs.delete_file(marker)

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            probe()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True, name="storage-probe")
    worker.start()
    worker.join(timeout)
    if not outcome:
        why = f"no answer within {timeout:g} s"
    elif outcome[0] is None:
        return
    else:
        e = outcome[0]
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    hint = ("check the bucket name, the endpoint (s3://BUCKET/PATH?endpoint_override=HOST:PORT&scheme=http, or "
            "AWS_ENDPOINT_URL on every node) and the credentials" if "://" in storage_path and
            not storage_path.startswith("file://") else "choose a folder this user can write (on storage every "
            "node mounts)")
    raise config_mod.ConfigError(f"scaling.storage_path={storage_path!r}: cannot write a file there ({why}); {hint}")


def _gpu_hours(cfg: TrialConfig, wall_s: float) -> float:
    s = cfg.scaling
    if not s.use_gpu:
        return 0.0
    return wall_s * max(s.num_workers, 1) * (s.gpus_per_worker if s.num_workers else 1) / 3600


def _absolute_paths(cfg: TrialConfig) -> TrialConfig:
    """Workers may run in another directory (Ray Train changes it) or on another node: send
    them absolute paths."""
    model = cfg.model
    if Path(model.pretrained).exists():
        model = model.model_copy(update={"pretrained": str(Path(model.pretrained).resolve())})
    return cfg.model_copy(update={"model": model, "out": str(cfg.out_dir.resolve())})


def _check_ingest_cpus(cfg: TrialConfig, materialized: bool) -> None:
    """A streaming ingest needs CPUs that the training workers do not reserve; without them
    Ray Data waits for ever. Say so instead of hanging."""
    import ray

    s = cfg.scaling
    if materialized or s.num_workers == 0:
        return
    total = ray.cluster_resources().get("CPU", 0)
    reserved = s.num_workers * s.cpus_per_worker
    if total - reserved < 1:
        raise config_mod.ConfigError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPUs reserve {reserved:g} of the cluster's "
            f"{total:g} CPUs, leaving none for streaming the data; lower scaling.cpus_per_worker, add CPUs, or set "
            f"data.materialize=always"
        )


def check_validation_shares(cfg: TrialConfig, n_train: int, n_val: int) -> None:
    """Ray Train gives every worker an equal share of the validation split (dropping the
    rest): with fewer validation images than workers each share is empty, and the trial would
    report no val_loss and no quick/* metric, so an ASHA or an objective on them ranks nothing.
    Say so before training instead."""
    s, d = cfg.scaling, cfg.data
    if s.num_workers <= 1 or d.val_fraction <= 0 or n_val >= s.num_workers:
        return
    enough = min(0.5, 2 * s.num_workers / max(n_train + n_val, 1))  # the split is by hash: aim above
    raise config_mod.ConfigError(
        f"data.val_fraction {d.val_fraction:g}: {n_val} validation image(s) of {d.path} for scaling.num_workers "
        f"{s.num_workers}, and Ray Train gives each worker an equal share, so every share is empty and no val_loss "
        f"is reported; raise data.val_fraction (about {enough:.2g} here), add images, or lower scaling.num_workers"
    )


def _wrapped(e: BaseException, name: str) -> str | None:
    """The message of our own exception `name` inside Ray's wrapping of `e`, if any."""
    for line in str(e).splitlines():
        if f"{name}: " in line:
            return line.split(f"{name}: ", 1)[-1].strip()
    return None


def failure_message(e: BaseException) -> str:
    """One line from a (possibly Ray-wrapped) training failure."""
    own = _wrapped(e, "TrainingError")
    if own is not None:
        return own
    for line in reversed(str(e).splitlines()):  # the innermost exception is printed last
        line = line.strip()
        if line and not line.startswith(("File ", "^", "~", "Traceback", "The above")):
            return line
    return type(e).__name__


def config_mistake(e: BaseException) -> BaseException | None:
    """The data's config mistake inside a (possibly Ray-wrapped) training failure: a
    `DepthError` that streamed data meets only while its batches are prepared (its scan reads
    headers), re-raised as itself (exit 2) instead of a training failure with a resume hint."""
    from sar_ray.data.normalize import DepthError

    message = _wrapped(e, "DepthError")
    return None if message is None else DepthError(message)


def run_trial(
    cfg: TrialConfig,
    *,
    fresh: bool = False,
    progress: bool = True,
    console=None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    tracker=None,
    tags: dict[str, str] | None = None,
    data=None,
    run_name: str | None = None,
    report_to: str = "train",
    check_memory: bool = True,
) -> TrialResult:
    """Train `cfg`'s strategy, save its weights and samples, log it; resumes from the newest
    checkpoint in the output folder unless `fresh`. `data`: datasets already built for
    `cfg.data` (a sweep builds them once for all its trials). `run_name`, `report_to`: see
    `train.build_trainer` (a sweep names each trial's run after its Tune trial)."""
    from .data import build_datasets
    from .data import cache as latent_cache

    started = time.time()
    if check_memory and cfg.scaling.gpu_memory_gb is not None:
        from .config import StudyConfig
        from .plan import check_memory as check

        # Before any compute: a strategy whose weights, gradients and optimizer state alone
        # exceed the stated GPU memory cannot run (a sweep checks every point once instead).
        check(StudyConfig.model_validate(cfg.model_dump()))
    cfg = _absolute_paths(cfg)
    out = cfg.out_dir
    if fresh:
        _clean(out)
        if cfg.scaling.storage_path:
            clear_run_storage(cfg.scaling.storage_path, run_name or train_run_name(cfg))
    out.mkdir(parents=True, exist_ok=True)
    uri = None
    if cfg.tracking.enabled and tracker is None:
        from .tracking import Tracker, default_uri

        uri = default_uri(cfg.tracking.uri)
        tracker = Tracker(uri, cfg.tracking.experiment)  # fails fast when unreachable
    connect_ray(cfg.scaling.address)
    if data is None:
        data = build_datasets(cfg.data, cfg.train.seed)
    # Cached posteriors where the VAE is frozen; cached text embeddings where the text side is.
    data, tags = latent_cache.for_trial(cfg, data, tags)
    _check_ingest_cpus(cfg, data.materialized)
    check_validation_shares(cfg, data.n_train, data.n_val)
    (out / "config.yaml").write_text(config_mod.dump_yaml(cfg))

    run_id = None
    if tracker is not None:
        from .tracking import remember_run, remembered_run

        run_id = tracker.start_run(
            run_name=f"{cfg.name}/{cfg.strategy.slug}",
            tags={"sar_ray.strategy": cfg.strategy.slug, "sar_ray.out": str(out.resolve()),
                  "sar_ray.model": cfg.model.pretrained, **(tags or {})},
            parent_run_id=parent_run_id,
            resume_run_id=remembered_run(out, tracker.uri),
        )
        remember_run(out, tracker.uri, run_id)
        tracker.log_params(run_id, config_mod.flatten(cfg))
        tracker.log_params(run_id, {"data.n_train": data.n_train, "data.n_val": data.n_val,
                                    "data.n_skipped": data.n_skipped, "data.source": data.source,
                                    "data.counts": "exact" if data.counts_exact else "at most"})

    bar = _ProgressBar(cfg, console) if progress else None
    monitor = TrialMonitor(out, tracker, run_id, bar)
    # Workers that cannot read this token back (another node, no shared filesystem) hand their
    # weights and samples over through the run's storage (train.publish_outputs).
    token = uuid.uuid4().hex
    (out / DRIVER_MARK).write_text(token)
    trainer = build_trainer(cfg, {"train": data.train, **({"val": data.val} if data.val is not None else {})}, out,
                            callbacks, name=run_name, report_to=report_to, progress=monitor.channel,
                            driver_token=token, text_cache=data.text_embeds)
    error: BaseException | None = None
    if bar is not None:
        bar.start()
    monitor.start()
    try:
        trainer.fit()
    except TrainingError as e:
        error = e
    except KeyboardInterrupt as e:
        error = e
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; keep one line
        error = config_mistake(e) or TrainingError(
            f"{failure_message(e)} (trial {cfg.strategy.slug}; rerun the same command to resume from the newest "
            f"checkpoint in {out / CHECKPOINTS_DIR if cfg.scaling.num_workers == 0 else out / 'ray'})"
        )
    finally:
        monitor.stop()
        if bar is not None:
            bar.stop()
    state = monitor.state
    if error is None and state.get("published"):
        try:
            fetch_outputs(out, state["published"])
        except OSError as e:
            error = TrainingError(f"trial {cfg.strategy.slug} trained, but its weights could not be fetched from "
                                  f"{state['published']} ({e}); check scaling.storage_path")

    if error is not None:
        if tracker is not None:
            tracker.set_tags(run_id, {"sar_ray.error": str(error)[:5000]})
            tracker.log_artifact(run_id, out / "config.yaml")
            if (out / LOG_FILE).is_file():
                tracker.log_artifact(run_id, out / LOG_FILE)
            tracker.end_run(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise error

    result = TrialResult(
        name=cfg.name,
        strategy=cfg.strategy.slug,
        out=out,
        weights=out / WEIGHTS_DIR,
        samples=out / "samples" / "final",
        step=state["step"],
        loss=state["loss"],
        val_loss=state["val_loss"],
        wall_s=time.time() - started,
        n_train=data.n_train,
        n_val=data.n_val,
        n_skipped=data.n_skipped,
        counts_exact=data.counts_exact,
        trainable_params=state["trainable_params"],
        peak_memory_mb=state["peak_memory_mb"],
        gpu_hours=_gpu_hours(cfg, time.time() - started),
        run_id=run_id,
        run_url=tracker.run_url(run_id) if tracker is not None else None,
    )
    (out / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
    if tracker is not None:
        if result.trainable_params is not None:
            tracker.log_params(run_id, {"trainable_params": result.trainable_params})
        tracker.log_metrics(run_id, [(f"cost/{k}", v, result.step) for k, v in result.cost().items()])
        tracker.log_artifacts(run_id, result.weights, "weights")
        tracker.log_artifacts(run_id, out / "samples", "samples")
        for name in ("config.yaml", LOG_FILE, "summary.json"):
            tracker.log_artifact(run_id, out / name)
        tracker.end_run(run_id, "FINISHED")
    return result


def summary(r: TrialResult) -> str:
    lines = [
        f"[bold]trial {r.name}/{r.strategy}[/bold] finished: {r.step} steps in {r.wall_s:.0f} s, "
        f"loss {_fmt(r.loss)}, val loss {_fmt(r.val_loss)}",
        f"  data      {'' if r.counts_exact else 'at most '}{r.n_train} train / {r.n_val} val images"
        + (f", {r.n_skipped} corrupt skipped" if r.n_skipped else "")
        + ("" if r.counts_exact else " (streamed, data.on_corrupt=skip: an image that does not decode is skipped "
           "in training; the worker log names it)"),
        f"  weights   {r.weights}",
        f"  samples   {r.samples}/grid.png",
        f"  log       {r.out / LOG_FILE}",
    ]
    if r.run_url:
        lines.append(f"  mlflow    {r.run_url}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


class _ProgressBar:
    """step, loss, it/s and ETA of the running trial (rich)."""

    def __init__(self, cfg: TrialConfig, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(cfg.strategy.slug, total=cfg.train.max_steps, loss="-", val="-", rate="-")
        self._t0, self._s0 = None, None

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def update(self, state: dict) -> None:
        now = time.perf_counter()
        step = state["step"]
        if self._t0 is None:
            self._t0, self._s0 = now, step
        rate = (step - self._s0) / (now - self._t0) if now > self._t0 and step > self._s0 else None
        self.progress.update(
            self.task,
            completed=step,
            loss=_fmt(state["loss"]),
            val=_fmt(state["val_loss"]),
            rate=f"{rate:.2f}" if rate else "-",
        )
