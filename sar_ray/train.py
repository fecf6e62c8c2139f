"""The per-worker training loop and the Ray Train `TorchTrainer` that runs it.

`worker_loop(config)` runs on every Ray Train worker (or in-process with
`ScalingConfig(num_workers=0)`, Ray Train's local mode). It reads only its argument: the
resolved trial config and the output folder. Rank 0 writes files; every rank calls
`ray.train.report` the same number of times.

Outputs in the trial folder (`cfg.out_dir`):
    train_log.jsonl          one line per logged step: loss, lr, images/s (rank 0)
    checkpoints/step-N/      resume state (local mode; Ray Train storage holds them otherwise)
    weights/                 what the trial learned, in diffusers-loadable formats
    samples/step-N/, final/  validation and final samples (PNG + metadata.jsonl + grid.png)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.data.dataset import MaterializedDataset
from ray.train.torch import TorchTrainer

from . import checkpoint as ckpt
from .config import TrialConfig
from .diffusion import Batch, compute_loss, validation_loss
from .models import Components, load_components
from .strategies import Applied, apply, enable_checkpointing, full_components, make_optimizer, place

LOG_FILE = "train_log.jsonl"
WEIGHTS_DIR = "weights"
CHECKPOINTS_DIR = "checkpoints"
# Fault injection for tests and drills: crash the worker right after this optimizer step.
CRASH_ENV = "SAR_RAY_CRASH_AT_STEP"


@dataclass
class Session:
    """The loop's one seam to Ray, built from public `ray.train` / `ray.tune` calls only:
    who this worker is, how it reports (metrics and checkpoints), where it resumes from and
    its dataset shards. The loop reads nothing else of Ray's."""

    rank: int
    world_size: int
    local_mode: bool  # Ray Train local mode (num_workers=0): the loop runs in the caller's process
    report: Callable[..., None]  # report(metrics, checkpoint=None)
    get_checkpoint: Callable[[], Checkpoint | None]
    dataset_shard: Callable[[str], Any]


def session_for(config: dict[str, Any]) -> Session:
    """The session of this worker. Local mode inside a Tune trial (a sweep with
    num_workers=0) runs no Ray Train callbacks, and `ray.train.report` refuses to run inside
    a Tune function: there the loop reports straight to Tune with `ray.tune.report`, and
    resumes from the trial folder's own checkpoints (as local mode always does)."""
    if config.get("local_mode") and config.get("report_to") == "tune":
        from ray import tune

        return Session(0, 1, True, lambda metrics, checkpoint=None: tune.report(dict(metrics)),
                       lambda: None, ray.train.get_dataset_shard)
    ctx = ray.train.get_context()
    return Session(ctx.get_world_rank(), ctx.get_world_size(), bool(config.get("local_mode")),
                   ray.train.report, ray.train.get_checkpoint, ray.train.get_dataset_shard)


class TrainingError(RuntimeError):
    """The training run itself failed (diverged, crashed); exit code 1."""


class RayConnectionError(RuntimeError):
    """Ray could not be reached at the given address; exit code 2."""


# --------------------------------------------------------------------------------------------
# setup helpers
# --------------------------------------------------------------------------------------------


def _device(cfg: TrialConfig, local_mode: bool) -> torch.device:
    if local_mode:
        # Local mode runs in the driver process, which Ray assigns no GPU ids.
        return torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    return ray.train.torch.get_device()


def make_lr_scheduler(optimizer, cfg: TrialConfig):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.train.lr_scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps
    )


def _ema_for(c: Components, applied: Applied, cfg: TrialConfig):
    if not (cfg.train.ema.enabled and applied.modes.get("unet") == "full"):
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(c.unet.parameters(), decay=cfg.train.ema.decay)


def _ema_state(ema, c: Components) -> dict[str, torch.Tensor] | None:
    if ema is None:
        return None
    names = [n for n, _ in c.unet.named_parameters()]
    return {n: t.detach().cpu() for n, t in zip(names, ema.shadow_params)}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


_COLUMNS = ("pixel_values", "text", "original_size", "crop_top_left")


def _to_batch(cols: dict[str, np.ndarray], device: torch.device) -> Batch:
    """Numpy columns of a micro-batch -> the step's Batch on `device`."""
    def geometry(key: str) -> torch.Tensor | None:
        return torch.from_numpy(np.array(cols[key], dtype=np.float32)).reshape(-1, 2) if key in cols else None

    pixels = torch.from_numpy(np.array(cols["pixel_values"], dtype=np.float32))  # (B, 3, R, R), a writable copy
    return Batch(pixels.to(device), [str(t) for t in cols["text"]], geometry("original_size"), geometry("crop_top_left"))


class EpochOrder:
    """This worker's micro-batches, one epoch at a time, in a seeded order that a resume
    reproduces exactly (`epoch(e, skip)` skips the micro-batches an interrupted epoch used).

    The table reaches Ray Data already in a seeded random order (`data.build_datasets`), so a
    shard is a random sample of the whole set, never the first rows of a sorted table.
    Materialized data (it fits the object store): the shard is read once and every epoch is a
    fresh seeded permutation of all its rows. Streamed data: Ray Data's order plus a seeded
    shuffle buffer per epoch (a true per-epoch permutation would re-shuffle the images).
    """

    def __init__(self, shard, batch_size: int, seed: int, rank: int, in_memory: bool):
        self.shard, self.batch_size, self.seed, self.rank = shard, batch_size, seed, rank
        self.in_memory = in_memory
        self._rows: dict[str, np.ndarray] | None = None

    def _read_all(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            parts: dict[str, list] = {}
            for b in self.shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2):
                for k in _COLUMNS:
                    if k in b:
                        parts.setdefault(k, []).append(np.asarray(b[k]))
            self._rows = {k: np.concatenate(v) for k, v in parts.items()}
        return self._rows

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        if not self.in_memory:
            yield from self._streamed(epoch, skip)
            return
        rows = self._read_all()
        n = len(rows["text"]) if rows else 0
        order = np.random.default_rng([self.seed % 2**63, epoch, self.rank]).permutation(n)
        for i in range(skip, n // self.batch_size):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield {k: v[idx] for k, v in rows.items()}

    def _streamed(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        it = self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(64, 16 * self.batch_size),
            local_shuffle_seed=self.seed * 1000 + epoch,
            prefetch_batches=2,
        )
        for i, batch in enumerate(it):
            if i >= skip:
                yield batch


def _drop_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """(n,) bool: which captions this step drops (unconditional examples), or None."""
    if p <= 0:
        return None
    return torch.rand(n, generator=generator) < p


def _flip(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(pixels.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(pixels.device), pixels.flip(-1), pixels)


# --------------------------------------------------------------------------------------------
# distributed helpers (manual all-reduce: one path for any mix of trainable components)
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_params(params: list[torch.nn.Parameter]) -> None:
    if _distributed():
        for p in params:
            dist.broadcast(p.data, src=0)


def _allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over workers (what DDP does, for parameters spread over several
    modules, with and without adapters, in one bucket)."""
    if not _distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _mean_over_workers(value: float, device: torch.device) -> float:
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


# --------------------------------------------------------------------------------------------
# resume state
# --------------------------------------------------------------------------------------------


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch


def _save_resume_state(path: Path, applied, optimizer, lr_sched, generator, ema, c, pos: Position, extra: dict) -> None:
    tensors = {f"param/{k}": v for k, v in ckpt.trainable_state(applied).items()}
    opt_t, opt_meta = ckpt.optimizer_state_to_tensors(optimizer)
    tensors.update({f"optim/{k}": v for k, v in opt_t.items()})
    tensors["rng/generator"] = generator.get_state()
    ema_state = _ema_state(ema, c)
    if ema_state:
        tensors.update({f"ema/{k}": v for k, v in ema_state.items()})
    meta = {
        "step": pos.step,
        "epoch": pos.epoch,
        "micro_in_epoch": pos.micro_in_epoch,
        "optimizer": opt_meta,
        "lr_scheduler": lr_sched.state_dict(),
        "ema_step": getattr(ema, "optimization_step", None),
        **extra,
    }
    ckpt.save_state(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)


def _load_resume_state(path: Path, applied, optimizer, lr_sched, generator, ema, c) -> tuple[Position, dict]:
    tensors, meta = ckpt.load_state(path)

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    ckpt.load_trainable_state(applied, section("param/"))
    ckpt.optimizer_state_from_tensors(optimizer, section("optim/"), meta["optimizer"])
    lr_sched.load_state_dict(meta["lr_scheduler"])
    generator.set_state(tensors["rng/generator"])
    if ema is not None:
        ema_t = section("ema/")
        names = [n for n, _ in c.unet.named_parameters()]
        if ema_t:
            ema.shadow_params = [ema_t[n].to(p.device) for n, p in zip(names, c.unet.parameters())]
            ema.optimization_step = meta.get("ema_step") or 0
    return Position(meta["step"], meta["epoch"], meta["micro_in_epoch"]), meta


def _newest_local_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """A resumed run rewrites history after its checkpoint: keep only lines up to `step`."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train one trial on this worker. `config = {"cfg": TrialConfig as dict, "out": str,
    "local_mode": bool}`."""
    cfg = TrialConfig.model_validate(config["cfg"])
    out = Path(config["out"])
    local_mode = bool(config.get("local_mode"))
    t = cfg.train
    api = session_for(config)
    rank, world = api.rank, api.world_size
    device = _device(cfg, local_mode)
    log_path = out / LOG_FILE

    # Same seed on every rank: identical initial weights and adapters (also broadcast below).
    torch.manual_seed(t.seed)
    # Fully tuned components load in fp32 straight away (a bf16 load then upcast loses bits).
    c = load_components(cfg.model, keep_fp32=full_components(cfg.strategy))
    applied = apply(c, cfg.strategy, t.lr)
    place(c, applied, device, cfg.model.weight_dtype, cfg.model.vae_force_upcast)
    for name, module in c.modules().items():
        module.train(applied.modes.get(name, "frozen") != "frozen" or (name.startswith("text_encoder") and cfg.strategy.token == "learn"))
    if t.gradient_checkpointing:
        enable_checkpointing(c, applied, cfg.strategy.token == "learn")
    params = applied.trainable_parameters()
    _broadcast_params(params)
    optimizer = make_optimizer(applied, cfg)
    lr_sched = make_lr_scheduler(optimizer, cfg)
    ema = _ema_for(c, applied, cfg)
    if ema is not None:
        ema.to(device)
    # fp16 needs loss scaling (bf16 has fp32's range and does not).
    scaler = torch.amp.GradScaler(device.type) if t.mixed_precision == "fp16" and device.type == "cuda" else None
    # Per-rank stream of every random draw (noise, timesteps, dropout, flips); saved in checkpoints.
    generator = torch.Generator().manual_seed(t.seed * 1000 + rank + 1)

    # A divergence is deterministic: a restart (Ray Train's in place, Tune's retry, a rerun of
    # the same command) would resume into the same NaN. Fail at once instead of computing again.
    diverged = _diverged(out, cfg)
    if diverged:
        raise TrainingError(f"{diverged} (diverged before with this exact config: change it, or use --fresh)")
    pos, meta = Position(), {}
    resume_from = api.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as d:
            pos, meta = _load_resume_state(Path(d), applied, optimizer, lr_sched, generator, ema, c)
    elif local_mode and (newest := _newest_local_checkpoint(out)) is not None:
        pos, meta = _load_resume_state(newest, applied, optimizer, lr_sched, generator, ema, c)
    if pos.step and scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if pos.step:
            _truncate_log(log_path, pos.step)
            _append_log(log_path, {"event": "resumed", "step": pos.step, "time": time.time()})
        elif log_path.exists():
            log_path.unlink()
        _append_log(log_path, {"event": "start", "step": pos.step, "trainable_params": applied.num_trainable(),
                               "device": str(device), "world_size": world, "time": time.time()})

    order = EpochOrder(api.dataset_shard("train"), t.batch_size, t.seed, rank,
                       in_memory=bool(config.get("materialized")))
    val_batches = _load_val_batches(cfg, device, api)
    tune_vae = applied.modes.get("vae", "frozen") != "frozen"
    # Only a fresh start crashes: the retry that resumes from the checkpoint then goes through.
    crash_at = int(config.get("crash_at") or os.environ.get(CRASH_ENV, "0") or 0) if pos.step == 0 else 0

    last_loss = float("nan")
    last_val: float | None = None
    t_last, images_since = time.perf_counter(), 0
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    while pos.step < t.max_steps:
        seen_in_epoch = pos.micro_in_epoch  # resumed mid-epoch: those batches were already trained on
        for cols in order.epoch(pos.epoch, skip=pos.micro_in_epoch):
            seen_in_epoch += 1
            pos.micro_in_epoch += 1
            batch = _to_batch(cols, device)
            if cfg.data.flip:
                batch.pixels = _flip(batch.pixels, generator)
            batch.drop = _drop_mask(len(batch.captions), cfg.data.caption_dropout, generator)
            pixels = batch.pixels
            out_step = compute_loss(c, batch, t, generator, tune_vae, cfg.data.resolution)
            scaled = out_step.loss / t.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            micro += 1
            images_since += pixels.shape[0] * world
            if micro % t.grad_accum:
                continue

            # All-reduce before unscaling: every rank then sees the same inf/NaN and the
            # GradScaler skips (or takes) the step on all of them alike.
            _allreduce_grads(params)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if t.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(c.unet.parameters())
            pos.step += 1
            loss_value = _mean_over_workers(float(out_step.loss.detach()), device)
            if not math.isfinite(loss_value):
                message = (
                    f"loss is {loss_value} at step {pos.step} ({cfg.strategy.slug}); lower train.lr "
                    f"(now {t.lr}), set train.max_grad_norm, or use train.mixed_precision=bf16 instead of "
                    f"fp16; checkpoints up to step {pos.step - 1 - (pos.step - 1) % t.checkpoint_every} are kept"
                )
                if rank == 0:
                    _mark_diverged(out, cfg, message)
                raise TrainingError(message)
            last_loss = loss_value

            if rank == 0 and (pos.step % t.log_every == 0 or pos.step == t.max_steps):
                now = time.perf_counter()
                record = {
                    "step": pos.step,
                    "epoch": pos.epoch,
                    "loss": loss_value,
                    "lr": lr_sched.get_last_lr()[0],
                    "images_per_s": images_since / max(now - t_last, 1e-9),
                    "time": time.time(),
                }
                if out_step.vae_loss is not None:
                    record["vae_loss"] = float(out_step.vae_loss)
                _append_log(log_path, record)
                t_last, images_since = now, 0

            is_last = pos.step == t.max_steps
            metrics: dict[str, Any] = {"step": pos.step, "loss": loss_value}
            do_eval = pos.step % t.eval_every == 0 or is_last
            if do_eval and val_batches:
                last_val = _validate(c, val_batches, cfg, device)
                metrics["val_loss"] = last_val
                if rank == 0:
                    _append_log(log_path, {"step": pos.step, "val_loss": last_val, "time": time.time()})
            if rank == 0 and t.sample_every and pos.step % t.sample_every == 0 and not is_last:
                _validation_samples(c, cfg, out / "samples" / f"step-{pos.step:06d}", device)
            if pos.step % t.checkpoint_every == 0 or is_last:
                extra = {"slug": cfg.strategy.slug, "keep": t.checkpoints_to_keep, "grad_scaler": scaler.state_dict() if scaler is not None else None}
                _report_with_checkpoint(api, metrics, out, rank, extra, applied, optimizer, lr_sched, generator, ema, c, pos)
            elif do_eval:
                api.report(metrics)
            if crash_at and pos.step == crash_at:
                raise RuntimeError(f"simulated crash after step {pos.step} ({CRASH_ENV})")
            if is_last:
                break
        else:
            if seen_in_epoch == 0:
                raise TrainingError(
                    f"worker {rank} got no full batch of {t.batch_size} images: the training set is smaller "
                    f"than train.batch_size x scaling.num_workers; lower train.batch_size or add images"
                )
            pos.epoch += 1
            pos.micro_in_epoch = 0

    result = {"step": pos.step, "loss": last_loss, "val_loss": last_val}
    if rank == 0:
        _finish(c, applied, cfg, out, ema, device)
        _append_log(log_path, {"event": "end", "step": pos.step, "peak_memory_mb": _peak_memory_mb(device),
                               "time": time.time()})
    return result


DIVERGED_FILE = "diverged.json"


def _mark_diverged(out: Path, cfg: TrialConfig, message: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / DIVERGED_FILE).write_text(json.dumps({"fingerprint": cfg.fingerprint(), "error": message}))


def _diverged(out: Path, cfg: TrialConfig) -> str | None:
    """The error of an earlier divergence of this same config in `out` (None if there was none;
    a changed config, say a lower lr, trains again)."""
    path = out / DIVERGED_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc.get("error") if doc.get("fingerprint") == cfg.fingerprint() else None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _report_with_checkpoint(api, metrics, out, rank, extra, applied, optimizer, lr_sched, generator, ema, c, pos) -> None:
    """Every rank reports; rank 0 attaches the resume state. Local mode writes it straight
    into the trial folder (nothing else persists it); otherwise Ray Train copies it to storage
    and keeps the newest `checkpoints_to_keep`."""
    if rank != 0:
        api.report(metrics)
        return
    if api.local_mode:
        target = out / CHECKPOINTS_DIR / f"step-{pos.step:06d}"
        _save_resume_state(target, applied, optimizer, lr_sched, generator, ema, c, pos, extra)
        api.report(metrics, Checkpoint.from_directory(str(target)))
        old = sorted((out / CHECKPOINTS_DIR).glob("step-*"))[: -extra["keep"]]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _save_resume_state(Path(tmp), applied, optimizer, lr_sched, generator, ema, c, pos, extra)
        api.report(metrics, Checkpoint.from_directory(tmp))


def _load_val_batches(cfg: TrialConfig, device, api: Session) -> list[Batch]:
    """The validation shard, read once and kept (it is small: `eval_batches` micro-batches).
    The whole shard is iterated so that Ray Data's split iterators stay in step."""
    shard = api.dataset_shard("val") if cfg.data.val_fraction > 0 else None
    if shard is None:
        return []
    batches = []
    for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=False):
        if len(batches) < cfg.train.eval_batches:
            batches.append(_to_batch(batch, device))
    return batches


def _validate(c: Components, batches, cfg: TrialConfig, device) -> float:
    was = {n: m.training for n, m in c.modules().items()}
    for m in c.modules().values():
        m.eval()
    losses = [
        validation_loss(c, batch, cfg.train, seed=cfg.train.seed + i, resolution=cfg.data.resolution)
        for i, batch in enumerate(batches)
    ]
    for n, m in c.modules().items():
        m.train(was[n])
    return _mean_over_workers(float(np.mean(losses)), device)


def _validation_samples(c: Components, cfg: TrialConfig, out: Path, device) -> None:
    from .models import assemble_pipeline
    from .sample import generate

    was = {n: m.training for n, m in c.modules().items()}
    pipe = assemble_pipeline(c, cfg.sample.scheduler)
    generate(pipe, cfg.sample, cfg.sample_resolution, out, device=device, mixed_precision=cfg.train.mixed_precision)
    for n, m in c.modules().items():
        m.train(was[n])


def _finish(c: Components, applied: Applied, cfg: TrialConfig, out: Path, ema, device) -> None:
    """Rank 0: save diffusers-loadable weights, then sample from them through the same loading
    code a user runs (so the samples prove the saved files, not the in-memory modules)."""
    from .sample import generate, load_pipeline

    weights = out / WEIGHTS_DIR
    tmp = out / (WEIGHTS_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.save_outputs(c, applied, cfg.strategy, tmp, ema_unet_state=_ema_state(ema, c))
    shutil.rmtree(weights, ignore_errors=True)
    tmp.rename(weights)
    pipe = load_pipeline(cfg.model, weights, cfg.sample.scheduler, device)
    generate(pipe, cfg.sample, cfg.sample_resolution, out / "samples" / "final", device=device,
             mixed_precision=cfg.train.mixed_precision)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


def _probe(address: str, timeout: float = 3.0) -> None:
    """Ray retries an unreachable GCS for minutes; a plain TCP connect answers in seconds."""
    import socket

    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise RayConnectionError(
            f"cannot connect to Ray at {address!r} ({e.__class__.__name__}: {e}); start a cluster with "
            f"`ray start --head`, fix --address / RAY_ADDRESS, or unset them to run on a local Ray"
        ) from None


def connect_ray(address: str | None) -> None:
    """Use a running Ray (address or RAY_ADDRESS), else start a local one."""
    import logging

    # Ray Data prints a progress block per dataset execution; the trial has its own bar.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
    try:
        # A local Ray keeps its dashboard (on 127.0.0.1): Ray Train's placement-group cleaner
        # asks the state API, served by the dashboard, whether the controller is alive.
        ray.init(address=address, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayConnectionError(
            f"cannot connect to Ray at {address!r}: {msg}; start one with `ray start --head`, fix "
            f"--address / RAY_ADDRESS, or unset them to run locally (for a token-authenticated cluster "
            f"set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)"
        ) from None
    # After ray.init, which configures Ray's loggers.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def run_name(cfg: TrialConfig) -> str:
    """The Ray Train run name of `sar-ray trial`: Train V2 restores from (storage_path, name), so
    it must differ between trials that train differently (lr, seed, data, model, ...) and stay
    the same for a rerun that only trains longer or observes more (`TrialConfig.fingerprint`)."""
    return f"trial-{cfg.strategy.slug}-{cfg.fingerprint()}"


def build_trainer(cfg: TrialConfig, datasets: dict, out: Path, callbacks: list | None = None,
                  name: str | None = None, report_to: str = "train") -> TorchTrainer:
    """The TorchTrainer of one trial. `name`: its Ray Train run name (a sweep passes
    `<sweep>-<tune trial id>`; default `run_name(cfg)`). `report_to="tune"`: local mode inside a
    Tune trial, where the loop reports to Tune itself (see `session_for`)."""
    s = cfg.scaling
    local_mode = s.num_workers == 0
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    storage = s.storage_path or str((out / "ray").resolve())
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": str(out.resolve()), "local_mode": local_mode,
                           "materialized": isinstance(datasets.get("train"), MaterializedDataset),
                           "report_to": report_to,
                           # fault injection reaches workers started before the variable was set
                           "crash_at": int(os.environ.get(CRASH_ENV, "0") or 0)},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=None if local_mode else resources),
        run_config=RunConfig(
            name=name or run_name(cfg),
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=s.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )
