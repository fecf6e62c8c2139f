"""The per-worker training loop and the Ray Train `TorchTrainer` that runs it.

`worker_loop(config)` runs on every Ray Train worker (or in-process with
`ScalingConfig(num_workers=0)`, Ray Train's local mode). It reads only its argument: the
resolved trial config and the output folder. Rank 0 writes files and sends its log
records to the trial driver through a `ProgressChannel`; every rank calls `ray.train.report`
the same number of times. The loop is phases around one `TrainState`: setup, resume, step
(micro-batches, gradient sync during backward, the update), log / eval / samples /
checkpoint at their cadence, finish.

Outputs in the trial folder (`cfg.out_dir`):
    train_log.jsonl          one line per logged step: loss, lr, images/s (written by the driver)
    checkpoints/step-N/      resume state (local mode; Ray Train storage holds them otherwise)
    weights/                 what the trial learned, in diffusers-loadable formats
    samples/step-N/, final/  validation and final samples (PNG + metadata.jsonl + grid.png)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
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
from .data.dataset import epoch_caption
from .diffusion import Batch, StepOutput, compute_loss, random_flip, validation_loss
from .models import Components, load_components
from .strategies import Applied, apply, enable_checkpointing, full_components, make_optimizer, place

LOG_FILE = "train_log.jsonl"
WEIGHTS_DIR = "weights"
CHECKPOINTS_DIR = "checkpoints"
# Fault injection for tests and drills: crash the worker right after this optimizer step.
CRASH_ENV = "SAR_RAY_CRASH_AT_STEP"


@ray.remote(num_cpus=0)
class ProgressChannel:
    """What a trial's rank 0 tells its driver while it trains (log records: losses, lr,
    throughput, validation, events, sample grids as PNG bytes). An actor, so the driver needs
    no filesystem shared with the workers, and a Ray Train restart of the worker group keeps
    reporting to the same driver.

    Asynchronous, so `settle` can wait for the driver: rank 0 settles before each report, so
    what it logged up to a report is in `train_log.jsonl` and MLflow before the scheduler sees
    the report and may stop the trial (ASHA's stop ends the trial driver, and records still in
    flight were lost with it). Ray runs an async actor's calls out of order, even from one
    caller, so every call says where it stands: a sender numbers its `put`s (records are
    released in that order), `arrived`/`settle` name how many it sent, and the driver's
    `written` names how many drained records it has written.

    A record leaves the channel only when the driver asks for those after it (`drain(since)`),
    never when it is handed out: a drain whose reply the driver gave up on (a `ray.get` timeout
    on a loaded machine; Ray still runs the call) took its records with it, and a CI run lost
    a local trial's whole log that way, its final loss included."""

    def __init__(self):
        self._records: list[dict] = []  # in arrival order; the first is record number self._base
        self._base = 0  # records the driver has confirmed it holds (dropped from the channel)
        self._next: dict[str, int] = {}  # sender -> the next put it numbered that is not in yet
        self._early: dict[str, dict[int, list[dict]]] = {}  # puts that came in ahead of their turn
        self._written = 0  # records written to the trial folder and MLflow
        self._settling = 0  # callers waiting in settle

    @property
    def _total(self) -> int:
        return self._base + len(self._records)

    async def put(self, sender: str, seq: int, records: list[dict]) -> None:
        early = self._early.setdefault(sender, {})
        early[seq] = records
        nxt = self._next.get(sender, 0)
        while nxt in early:
            self._records.extend(early.pop(nxt))
            nxt += 1
        self._next[sender] = nxt

    async def drain(self, since: int = 0, wait: float = 0.0) -> tuple[list[dict], bool]:
        """(the records from number `since` on, whether a caller waits in `settle`). Asking
        from `since` confirms the ones before it, which leave the channel; a late, stale call
        (a smaller `since`) drops nothing more. Waits up to `wait` s when there is none and no
        settle waits on the driver (a settle still waiting for its own puts does not)."""
        deadline = time.monotonic() + wait
        while (self._total <= since and not (self._settling and self._written < self._total)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        since = min(since, self._total)  # (a caller never holds more than came in)
        if since > self._base:
            del self._records[: since - self._base]
            self._base = since
        return list(self._records), self._settling > 0

    async def written(self, upto: int) -> None:
        """The driver wrote the first `upto` drained records to the trial folder and to MLflow
        (calls may come in any order: the highest counts)."""
        self._written = max(self._written, upto)

    async def arrived(self, sender: str, sent: int, timeout: float) -> bool:
        """Wait until the first `sent` puts of `sender` are in."""
        return await self._until(lambda: self._next.get(sender, 0) >= sent, timeout)

    async def settle(self, sender: str, sent: int, timeout: float) -> bool:
        """Wait until the first `sent` puts of `sender` are in and the driver has drained and
        written every record."""
        self._settling += 1
        try:
            return await self._until(
                lambda: self._next.get(sender, 0) >= sent and self._written >= self._total, timeout)
        finally:
            self._settling -= 1

    @staticmethod
    async def _until(done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return done()


class _Progress:
    """Rank 0's side of the channel: `log` sends without waiting (each put numbered, as the
    actor may run them out of order); `flush` waits until everything sent has arrived;
    `settle` until the driver has also written it."""

    SETTLE_TIMEOUT = 10.0  # a driver this slow (an MLflow server that hangs) does not hold training

    def __init__(self, channel, rank: int):
        self.channel = channel if rank == 0 else None
        self._sender, self._sent = uuid.uuid4().hex, 0  # a restarted rank 0 is a new sender

    def log(self, record: dict) -> None:
        if self.channel is not None:
            self.channel.put.remote(self._sender, self._sent, [record])
            self._sent += 1

    def flush(self) -> None:
        if self.channel is None:
            return
        try:
            ray.get(self.channel.arrived.remote(self._sender, self._sent, 60.0), timeout=90)
        except Exception:  # noqa: BLE001 - a driver that is gone reads nothing; training results stand
            pass

    def settle(self) -> None:
        if self.channel is None:
            return
        try:
            ray.get(self.channel.settle.remote(self._sender, self._sent, self.SETTLE_TIMEOUT),
                    timeout=self.SETTLE_TIMEOUT + 30)
        except Exception:  # noqa: BLE001 - as in flush
            pass

    def settled(self, report: Callable[..., None]) -> Callable[..., None]:
        """`report`, called once the driver has written what this rank logged before it."""
        if self.channel is None:
            return report

        def settled_report(metrics, checkpoint=None):
            self.settle()
            return report(metrics, checkpoint=checkpoint)

        return settled_report


@dataclass
class Session:
    """The loop's one seam to Ray, built from public `ray.train` / `ray.tune` calls only:
    who this worker is, how it reports (metrics and checkpoints), where it resumes from, its
    dataset shards, and the channel its log records take to the trial driver. The loop reads
    nothing else of Ray's."""

    rank: int
    world_size: int
    local_mode: bool  # Ray Train local mode (num_workers=0): the loop runs in the caller's process
    report: Callable[..., None]  # report(metrics, checkpoint=None)
    get_checkpoint: Callable[[], Checkpoint | None]
    dataset_shard: Callable[[str], Any]
    log: Callable[[dict], None] = lambda record: None  # a log record for the driver (rank 0 only)
    flush: Callable[[], None] = lambda: None


def session_for(config: dict[str, Any]) -> Session:
    """The session of this worker. Local mode inside a Tune trial (a sweep with
    num_workers=0) runs no Ray Train callbacks, and `ray.train.report` refuses to run inside
    a Tune function: there the loop reports straight to Tune with `ray.tune.report`, and
    resumes from the trial folder's own checkpoints (as local mode always does)."""
    if config.get("local_mode") and config.get("report_to") == "tune":
        from ray import tune

        progress = _Progress(config.get("progress"), 0)
        return Session(0, 1, True, progress.settled(lambda metrics, checkpoint=None: tune.report(dict(metrics))),
                       lambda: None, ray.train.get_dataset_shard, progress.log, progress.flush)
    ctx = ray.train.get_context()
    progress = _Progress(config.get("progress"), ctx.get_world_rank())
    return Session(ctx.get_world_rank(), ctx.get_world_size(), bool(config.get("local_mode")),
                   progress.settled(ray.train.report), ray.train.get_checkpoint, ray.train.get_dataset_shard,
                   progress.log,
                   progress.flush)


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



_COLUMNS = ("pixel_values", "text", "original_size", "crop_top_left", "latent_moments", "latent_moments_flip",
            "texts", "key")  # texts, key: only with several caption columns (see EpochOrder)


def _to_batch(cols: dict[str, np.ndarray], device: torch.device, text_cache=None) -> Batch:
    """Numpy columns of a micro-batch -> the step's Batch on `device` (`text_cache`: the trial's
    `data.cache.TextEmbeddings`, where the text-embedding cache feeds it).

    Pixels may arrive lean (uint8 / uint16 / float16, one channel) and become the model's
    (B, 3, R, R) float32 in [-1, 1] on the device: the copy to the device moves the narrow
    array (pinned, non-blocking on CUDA), and SAR amplitude is replicated to 3 channels there."""
    def geometry(key: str) -> torch.Tensor | None:
        return torch.from_numpy(np.array(cols[key], dtype=np.float32)).reshape(-1, 2) if key in cols else None

    if "latent_moments" in cols:  # the latent cache (data.cache): posteriors, no pixels
        def moments(key: str) -> torch.Tensor | None:
            if key not in cols:
                return None
            m = cols[key]
            return torch.from_numpy(np.stack(list(m)) if m.dtype == object else np.array(m)).to(device)

        return Batch(None, [str(t) for t in cols["text"]], geometry("original_size"), geometry("crop_top_left"),
                     latent_moments=moments("latent_moments"), latent_moments_flip=moments("latent_moments_flip"),
                     text_cache=text_cache)
    arr = cols["pixel_values"]
    arr = np.stack(list(arr)) if arr.dtype == object else np.array(arr)  # a writable copy
    px = torch.from_numpy(arr)
    if device.type == "cuda":
        px = px.pin_memory().to(device, non_blocking=True)
    return Batch(model_pixels(px.to(device)), [str(t) for t in cols["text"]], geometry("original_size"),
                 geometry("crop_top_left"), text_cache=text_cache)


def model_pixels(px: torch.Tensor) -> torch.Tensor:
    """(B, R, R), (B, 1, R, R) or (B, 3, R, R) pixels, integer in [0, max] or float in [-1, 1]
    -> float32 (B, 3, R, R) in [-1, 1]."""
    if px.dtype in (torch.uint8, torch.uint16, torch.int32):
        scale = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.int32: 65535.0}[px.dtype]
        px = px.float() * (2.0 / scale) - 1.0
    else:
        px = px.float()
    if px.dim() == 3:
        px = px[:, None]
    if px.shape[1] == 1:
        px = px.expand(-1, 3, -1, -1).contiguous()
    return px


class EpochOrder:
    """This worker's micro-batches, one epoch at a time, in a seeded order that a resume
    reproduces exactly (`epoch(e, skip)` skips the micro-batches an interrupted epoch used).

    The table reaches Ray Data already in a seeded random order (`data.build_datasets`), so a
    shard is a random sample of the whole set, never the first rows of a sorted table.
    Materialized data (it fits the object store): the shard is read once and every epoch is a
    fresh seeded permutation of all its rows. Streamed data: Ray Data's order plus a seeded
    shuffle buffer per epoch (a true per-epoch permutation would re-shuffle the images).
    Rows with several candidate captions (`texts`) train under the one `dataset.epoch_caption`
    picks for (image, epoch, seed): `text` is replaced in each yielded micro-batch.
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
        batches = self._streamed(epoch, skip) if not self.in_memory else self._in_memory(epoch, skip)
        for cols in batches:
            yield _epoch_captions(cols, epoch, self.seed) if "texts" in cols else cols

    def _in_memory(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
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


def _epoch_captions(cols: dict[str, np.ndarray], epoch: int, seed: int) -> dict[str, np.ndarray]:
    """`cols` with `text` set to each row's caption for `epoch` (a copy; the rows stay as read)."""
    text = np.asarray([epoch_caption(t, k, epoch, seed) for t, k in zip(cols["texts"], cols["key"])], dtype=object)
    return {**cols, "text": text}


def _drop_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """(n,) bool: which captions this step drops (unconditional examples), or None."""
    if p <= 0:
        return None
    return torch.rand(n, generator=generator, device=generator.device) < p


# --------------------------------------------------------------------------------------------
# gradient sync: torch DDP over the trainable modules, bucketed and overlapped with backward
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_params(params: list[torch.nn.Parameter]) -> None:
    if _distributed():
        for p in params:
            dist.broadcast(p.data, src=0)


def _mean_over_workers(value: torch.Tensor | float, device: torch.device) -> float:
    """The mean over workers of a scalar (a host sync: only where a value is logged)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).detach().reshape(1).clone()
    if _distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


class _LossModule(torch.nn.Module):
    """Holds every component that trains, so that one DDP wraps them all (UNet, text
    encoders, VAE decoder, token rows, with or without adapters); its forward is the step's
    loss, so DDP sees the whole graph it has to reduce."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)

    def forward(self, fn: Callable[..., StepOutput], *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = fn(*args)
        return out.loss, out.diffusion_loss, out.vae_loss


class GradSync:
    """Averages gradients over workers during backward: torch DDP's bucketed all-reduce, each
    bucket launched as soon as its gradients are ready, gradients kept as views of the buckets
    (no flat copy of all of them). One worker (or local mode): plain calls.

    `find_unused_parameters` where a rank's batch may leave a trainable parameter without a
    gradient: a text side that trains sees no `<SAR>` row when every caption of a rank is
    dropped, and SDXL's first encoder never uses its last layer. Gradient accumulation syncs
    on the last micro-batch only (`no_sync` before)."""

    def __init__(self, c: Components, applied: Applied, cfg: TrialConfig, device: torch.device):
        self.ddp = None
        if not _distributed():
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        trains = {n: m for n, m in c.modules().items() if any(p.requires_grad for p in m.parameters())}
        text_trains = cfg.strategy.token == "learn" or any(
            applied.modes.get(n, "frozen") != "frozen" for n in c.text_encoder_names)
        self.ddp = DDP(
            _LossModule(trains),
            device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
            broadcast_buffers=False,  # frozen buffers are equal on every rank; nothing to send
            init_sync=False,  # trainable weights are broadcast once (_broadcast_params), not the frozen model
            find_unused_parameters=text_trains,
            gradient_as_bucket_view=True,
        )

    def accumulating(self, sync: bool):
        """Context of one micro-batch: `sync` False (not the last of an accumulation) keeps
        its gradients local, as DDP's `no_sync`."""
        return self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()

    def forward(self, fn: Callable[..., StepOutput], *args) -> StepOutput:
        """The step's loss, through DDP when there is one (so that its backward reduces)."""
        return fn(*args) if self.ddp is None else StepOutput(*self.ddp(fn, *args))


# --------------------------------------------------------------------------------------------
# the training state: what a worker holds between steps, and its resume file
# --------------------------------------------------------------------------------------------


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch


@dataclass
class TrainState:
    """Everything one worker's training holds between steps; `save` / `load` are its resume
    state (trainable weights, optimizer, lr schedule, random stream, EMA, grad scaler, position)."""

    cfg: TrialConfig
    device: torch.device
    c: Components
    applied: Applied
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_sched: Any
    ema: Any
    scaler: Any
    generator: torch.Generator  # every random draw of this rank (noise, timesteps, dropout, flips)
    sync: GradSync
    pos: Position = field(default_factory=Position)
    # The first step whose loss was not finite (0: none), kept on the device so that the
    # check costs no host sync per step; read where the loss is logged or a checkpoint is due.
    first_bad: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # the newest step's loss, on the device
    logged_loss: tuple[int, float] | None = None  # (step, mean over workers) of the newest logged loss
    val_loss: float | None = None
    encoder_calls: Any = None  # data.cache.EncoderCalls: VAE encoder forward calls of this worker
    text_calls: Any = None  # data.cache.TextEncoderCalls: text encoder forward calls of this worker's steps
    text_cache: Any = None  # data.cache.TextEmbeddings where the text-embedding cache feeds the steps
    # quick/<metric> of the newest validation samples (rank 0), in every later report so that a
    # scheduler ranking on one never reads a result without it; kept across a resume.
    quick: dict[str, float] = field(default_factory=dict)
    val_images: np.ndarray | None = None  # the validation images in [0, 1], pooled (quick metrics), built once

    def save(self, path: Path, extra: dict) -> None:
        tensors = {f"param/{k}": v for k, v in ckpt.trainable_state(self.applied).items()}
        opt_t, opt_meta = ckpt.optimizer_state_to_tensors(self.optimizer)
        tensors.update({f"optim/{k}": v for k, v in opt_t.items()})
        tensors["rng/generator"] = self.generator.get_state()
        ema_state = _ema_state(self.ema, self.c)
        if ema_state:
            tensors.update({f"ema/{k}": v for k, v in ema_state.items()})
        meta = {
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "micro_in_epoch": self.pos.micro_in_epoch,
            "optimizer": opt_meta,
            "lr_scheduler": self.lr_sched.state_dict(),
            "ema_step": getattr(self.ema, "optimization_step", None),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "quick": self.quick,
            **extra,
        }
        ckpt.save_state(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)

    def load(self, path: Path) -> dict:
        tensors, meta = ckpt.load_state(path)

        def section(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        ckpt.load_trainable_state(self.applied, section("param/"))
        ckpt.optimizer_state_from_tensors(self.optimizer, section("optim/"), meta["optimizer"])
        self.lr_sched.load_state_dict(meta["lr_scheduler"])
        self.generator.set_state(tensors["rng/generator"])
        if self.ema is not None and (ema_t := section("ema/")):
            names = [n for n, _ in self.c.unet.named_parameters()]
            self.ema.shadow_params = [ema_t[n].to(p.device) for n, p in zip(names, self.c.unet.parameters())]
            self.ema.optimization_step = meta.get("ema_step") or 0
        if self.scaler is not None and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.pos = Position(meta["step"], meta["epoch"], meta["micro_in_epoch"])
        self.quick = dict(meta.get("quick") or {})
        return meta


def _newest_local_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _stored_step(fs, folder: str) -> int:
    """The step of the checkpoint folder `folder` on `fs`, from its `state.json` (read alone,
    not the maybe multi-GB folder)."""
    with fs.open_input_stream(f"{folder}/{ckpt.STATE_META}") as f:
        return int(json.loads(f.read())["meta"]["step"])


def stored_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder of the Train run at `run_uri` (local or object
    storage) whose `state.json` is complete, newest step last."""
    import pyarrow.fs as pafs

    fs, root = _storage(run_uri)
    found = []
    try:
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
    except OSError:
        return []
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            found.append((_stored_step(fs, info.path), info.path))
        except (OSError, ValueError, KeyError, TypeError):  # being written, or torn: not a candidate
            continue
    return sorted(found)


def _resume_from_storage(state: TrainState, api: Session, run_uri: str | None) -> None:
    """Resume a Train worker group from the newest checkpoint of its run.

    Ray Train hands back the newest checkpoint its controller registered. A worker lost after
    persisting a checkpoint but before the controller recorded it (a node preempted mid-report)
    leaves a newer complete one on storage that Train does not know: rank 0 lists the run's
    storage, picks the newest complete checkpoint of either kind, and every rank loads that one
    (a torn candidate falls back to Train's)."""
    known = api.get_checkpoint()
    choice = None
    if api.rank == 0 and run_uri:
        stored = stored_checkpoints(run_uri)
        known_step = -1
        if known is not None:
            try:
                known_step = _stored_step(known.filesystem, known.path)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        if stored and stored[-1][0] > known_step:
            choice = stored[-1][1]
    if api.world_size > 1 and dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0, device=state.device if state.device.type == "cuda" else None)
        choice = box[0]
    if choice is not None:
        try:
            with tempfile.TemporaryDirectory(prefix="sar-ray-resume-") as tmp:
                import pyarrow.fs as pafs

                fs, _ = _storage(run_uri)
                pafs.copy_files(choice, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                state.load(Path(tmp))
            api.log({"event": "resumed_from_storage", "step": state.pos.step, "path": choice, "time": time.time()})
            return
        except (OSError, ValueError) as e:  # torn between its two files: Train's own checkpoint instead
            api.log({"event": "warning", "message": f"checkpoint {choice} unreadable ({e}); using Ray Train's"})
    if known is not None:
        with known.as_directory() as d:
            state.load(Path(d))


# --------------------------------------------------------------------------------------------
# the loop, in phases: setup, resume, step, eval, checkpoint, finish
# --------------------------------------------------------------------------------------------


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train one trial on this worker. `config = {"cfg": TrialConfig as dict, "out": str,
    "local_mode": bool, "materialized": bool, "progress": ProgressChannel | None, ...}`."""
    cfg = TrialConfig.model_validate(config["cfg"])
    out = Path(config["out"])
    api = session_for(config)
    try:
        state = _setup(cfg, api, config.get("text_cache"))
        _resume(state, api, out, config.get("run_uri"))
        order = EpochOrder(api.dataset_shard("train"), cfg.train.batch_size, cfg.train.seed, api.rank,
                           in_memory=bool(config.get("materialized")))
        val_batches = _load_val_batches(cfg, state.device, api, state.text_cache)
        # Fault injection; only a fresh start crashes, so the retry that resumes goes through.
        crash_at = int(config.get("crash_at") or os.environ.get(CRASH_ENV, "0") or 0) if state.pos.step == 0 else 0
        _train(state, api, out, order, val_batches, crash_at)
        return _finish(state, api, out, config.get("outputs"))
    finally:
        api.flush()  # everything rank 0 logged reaches the driver, also when a step raised


def _setup(cfg: TrialConfig, api: Session, text_table: dict | None = None) -> TrainState:
    """Phase setup: load the model, apply the strategy, place it, build optimizer and sync.
    `text_table`: the text-embedding cache (`data.cache.open_text`) the steps read, or None."""
    t = cfg.train
    device = _device(cfg, api.local_mode)
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
    ema = _ema_for(c, applied, cfg)
    if ema is not None:
        ema.to(device)
    state = TrainState(
        cfg=cfg, device=device, c=c, applied=applied, params=params, optimizer=optimizer,
        lr_sched=make_lr_scheduler(optimizer, cfg), ema=ema,
        # fp16 needs loss scaling (bf16 has fp32's range and does not).
        scaler=torch.amp.GradScaler(device.type) if t.mixed_precision == "fp16" and device.type == "cuda" else None,
        generator=torch.Generator(device=device).manual_seed(t.seed * 1000 + api.rank + 1),
        sync=GradSync(c, applied, cfg, device),
        first_bad=torch.zeros((), dtype=torch.long, device=device),
    )
    optimizer.zero_grad(set_to_none=True)
    from .data.cache import EncoderCalls, TextEmbeddings, TextEncoderCalls

    state.encoder_calls = EncoderCalls(c.vae)
    state.text_calls = TextEncoderCalls(c.text_encoders)
    if text_table is not None:
        if cfg.strategy.token == "learn" or any(applied.modes.get(n, "frozen") != "frozen" for n in c.text_encoder_names):
            raise TrainingError("the text-embedding cache was given to a trial whose text side trains")
        state.text_cache = TextEmbeddings(text_table, device)
    return state


def _resume(state: TrainState, api: Session, out: Path, run_uri: str | None = None) -> None:
    """Phase resume: from the run's newest checkpoint (Ray Train's, or a newer complete one on
    the run's storage; in local mode, the trial folder's), or refuse to start again into a
    known divergence."""
    cfg = state.cfg
    # A divergence is deterministic: a restart (Ray Train's in place, Tune's retry, a rerun of
    # the same command) would resume into the same NaN. Fail at once instead of computing again.
    diverged = _diverged(out, cfg)
    if diverged:
        raise TrainingError(f"{diverged} (diverged before with this exact config: change it, or use --fresh)")
    if api.local_mode:
        resume_from = api.get_checkpoint()
        if resume_from is not None:
            with resume_from.as_directory() as d:
                state.load(Path(d))
        elif (newest := _newest_local_checkpoint(out)) is not None:
            state.load(newest)
    else:
        _resume_from_storage(state, api, run_uri)
    if state.pos.step:
        api.log({"event": "resumed", "step": state.pos.step, "time": time.time()})
    api.log({"event": "start", "step": state.pos.step, "trainable_params": state.applied.num_trainable(),
             "device": str(state.device), "world_size": api.world_size, "time": time.time()})


def _train(state: TrainState, api: Session, out: Path, order: EpochOrder, val_batches: list[Batch],
           crash_at: int) -> None:
    """Epochs of micro-batches until `train.max_steps` optimizer steps, with eval, samples
    and checkpoints at their cadence."""
    t, pos = state.cfg.train, state.pos
    tune_vae = state.applied.modes.get("vae", "frozen") != "frozen"
    meter = _Throughput()
    micro = 0
    while pos.step < t.max_steps:
        seen_in_epoch = pos.micro_in_epoch  # resumed mid-epoch: those batches were already trained on
        for cols in order.epoch(pos.epoch, skip=pos.micro_in_epoch):
            seen_in_epoch += 1
            pos.micro_in_epoch += 1
            micro += 1
            batch = _to_batch(cols, state.device, state.text_cache)
            meter.images += batch.size * api.world_size
            last_micro = micro % t.grad_accum == 0
            step_out = _micro_step(state, batch, tune_vae, last_micro)
            if not last_micro:
                continue
            _optimizer_step(state, step_out)
            _after_step(state, api, out, val_batches, meter, step_out)
            if crash_at and pos.step == crash_at:
                raise RuntimeError(f"simulated crash after step {pos.step} ({CRASH_ENV})")
            if pos.step == t.max_steps:
                break
        else:
            if seen_in_epoch == 0:
                raise TrainingError(
                    f"worker {api.rank} got no full batch of {t.batch_size} images: the training set is smaller "
                    f"than train.batch_size x scaling.num_workers; lower train.batch_size or add images"
                )
            pos.epoch += 1
            pos.micro_in_epoch = 0


class _Throughput:
    def __init__(self):
        self.images, self.t0 = 0, time.perf_counter()

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.images / max(now - self.t0, 1e-9)
        self.images, self.t0 = 0, now
        return r


def _micro_step(state: TrainState, batch: Batch, tune_vae: bool, sync: bool) -> StepOutput:
    """Phase step, one micro-batch: random augmentations from this rank's stream, the loss,
    backward (DDP all-reduces its buckets during backward on the last micro-batch)."""
    cfg, t = state.cfg, state.cfg.train
    if cfg.data.flip:
        batch = random_flip(batch, state.generator)  # pixels, or the cached flipped posterior
    batch.drop = _drop_mask(len(batch.captions), cfg.data.caption_dropout, state.generator)
    with state.sync.accumulating(sync):
        step_out = state.sync.forward(compute_loss, state.c, batch, t, state.generator, tune_vae, cfg.data.resolution)
        scaled = step_out.loss / t.grad_accum
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
    return step_out


def _optimizer_step(state: TrainState, step_out: StepOutput) -> None:
    """Phase step, the update: gradients are already averaged over workers (every rank then
    sees the same inf/NaN, so the GradScaler skips or takes the step on all of them alike)."""
    t, opt = state.cfg.train, state.optimizer
    if state.scaler is not None:
        state.scaler.unscale_(opt)
    if t.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(state.params, t.max_grad_norm)
    if state.scaler is not None:
        state.scaler.step(opt)
        state.scaler.update()
    else:
        opt.step()
    state.lr_sched.step()
    # DDP keeps each gradient as a view of its bucket: zero it in place (set_to_none would
    # make backward allocate every gradient again, then copy it into the bucket).
    opt.zero_grad(set_to_none=state.sync.ddp is None)
    if state.ema is not None:
        state.ema.step(state.c.unet.parameters())
    state.pos.step += 1
    state.loss = step_out.loss.detach()
    bad = (state.first_bad == 0) & ~torch.isfinite(state.loss)
    state.first_bad = torch.where(bad, torch.full_like(state.first_bad, state.pos.step), state.first_bad)


def _check_finite(state: TrainState, api: Session, out: Path) -> None:
    """A non-finite loss on any rank fails the trial (before a checkpoint could keep it)."""
    first_bad = _first_bad_step(state)
    if first_bad is None:
        return
    cfg, t = state.cfg, state.cfg.train
    kept = (first_bad - 1) - (first_bad - 1) % t.checkpoint_every
    message = (
        f"loss is nan at step {first_bad} ({cfg.strategy.slug}); lower train.lr (now {t.lr}), set "
        f"train.max_grad_norm, or use train.mixed_precision=bf16 instead of fp16; checkpoints up to step "
        f"{kept} are kept"
    )
    if api.rank == 0:
        _mark_diverged(out, cfg, message)
    raise TrainingError(message)


_NONE = 2**62


def _first_bad_step(state: TrainState) -> int | None:
    """The first step with a non-finite loss on any rank, or None (a collective: ranks agree)."""
    t = torch.where(state.first_bad == 0, torch.full_like(state.first_bad, _NONE), state.first_bad).reshape(1)
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    step = int(t.item())
    return None if step == _NONE else step


def _after_step(state: TrainState, api: Session, out: Path, val_batches: list[Batch], meter: _Throughput,
                step_out: StepOutput) -> None:
    """Phases log, eval, samples and checkpoint, each at its cadence. The host waits for the
    device only here (the logged loss), never on the other steps."""
    cfg, t, step = state.cfg, state.cfg.train, state.pos.step
    is_last = step == t.max_steps
    do_log = step % t.log_every == 0 or is_last
    do_eval = step % t.eval_every == 0 or is_last
    do_ckpt = step % t.checkpoint_every == 0 or is_last
    if not (do_log or do_eval or do_ckpt):
        return
    _check_finite(state, api, out)
    loss = _mean_over_workers(state.loss, state.device)
    state.logged_loss = (step, loss)
    if do_log:
        record = {"step": step, "epoch": state.pos.epoch, "loss": loss, "lr": state.lr_sched.get_last_lr()[0],
                  "images_per_s": meter.rate(), "time": time.time()}
        if step_out.vae_loss is not None:
            record["vae_loss"] = float(step_out.vae_loss)
        api.log(record)
    metrics: dict[str, Any] = {"step": step, "loss": loss}
    if do_eval and val_batches:
        state.val_loss = _validate(state.c, val_batches, cfg, state.device)
        metrics["val_loss"] = state.val_loss
        api.log({"step": step, "val_loss": state.val_loss, "time": time.time()})
    do_sample = bool(t.sample_every) and step % t.sample_every == 0 and not is_last
    if do_sample:
        folder = out / "samples" / f"step-{step:06d}"  # every rank samples its share; rank 0 writes
        with state.text_calls.paused() if state.text_calls is not None else nullcontext():
            got = _validation_samples(state.c, cfg, folder, state.device, api)  # prompts: not the cache's
        _log_grid(api, folder, step, got.rows_per_rank if got is not None else None)
        if got is not None and val_batches:  # rank 0
            state.quick = _quick_metrics(state, got.amplitudes, val_batches)
            api.log({"step": step, **state.quick, "time": time.time()})
    metrics.update(state.quick)
    if do_ckpt:
        _report_with_checkpoint(state, api, metrics, out)
    elif do_eval or do_sample:
        api.report(metrics)


def _quick_metrics(state: TrainState, generated: list[np.ndarray], val_batches: list[Batch]) -> dict[str, float]:
    """`quick/stats/*` of the validation samples (the [0, 1] arrays rank 0 gathered) against
    the validation images (see `metrics.quick`): a realism signal at each sampling step, for
    ASHA's rungs."""
    from .metrics.quick import quick_metrics

    if state.val_images is None:  # the validation images do not change: pooled once per run
        reference = []
        with torch.no_grad():
            for b in val_batches:
                if b.pixels is not None:
                    px = b.pixels
                else:  # the latent cache fed the step: the validation images are the posterior means, decoded
                    vae = state.c.vae
                    mean = b.latent_moments[:, : b.latent_moments.shape[1] // 2].to(vae.device, vae.dtype)
                    px = vae.decode(mean).sample
                reference.append(((px.float().mean(1).clamp(-1, 1) + 1) / 2).cpu().numpy().ravel())
        state.val_images = np.concatenate(reference)
    if not generated or not state.val_images.size:
        return {}
    # Only the pooled amplitude histograms are compared: image shapes need not agree.
    return quick_metrics(np.concatenate([g.ravel() for g in generated]), state.val_images)


def _log_grid(api: Session, folder: Path, step: int | str, rows_per_rank: list[int] | None = None) -> None:
    grid = folder / "grid.png"
    if api.rank == 0 and grid.is_file():  # the bytes travel: the driver may share no filesystem with this worker
        api.log({"event": "samples", "step": step, "folder": folder.name, "grid_png": grid.read_bytes(),
                 "rows_per_rank": rows_per_rank, "time": time.time()})


def _finish(state: TrainState, api: Session, out: Path, outputs: dict | None = None) -> dict[str, Any]:
    """Phase finish: rank 0 saves diffusers-loadable weights, then every rank samples its share
    of the final prompt x seed rows from them through the same loading code a user runs (so
    the samples prove the saved files, not the in-memory modules) and rank 0 writes the
    folder. Where the driver cannot see this folder (another node, no shared filesystem) they
    also go to the run's storage for the driver to fetch (`publish_outputs`)."""
    if state.logged_loss is not None and state.logged_loss[0] == state.pos.step:  # the last step always logs
        loss = state.logged_loss[1]
    else:  # no step ran here (resumed at max_steps)
        loss = _mean_over_workers(state.loss, state.device) if state.loss is not None else float("nan")
    result = {"step": state.pos.step, "loss": loss, "val_loss": state.val_loss}
    from .sample import generate, load_pipeline

    cfg = state.cfg
    weights = out / WEIGHTS_DIR
    token = None
    if api.rank == 0:
        tmp = out / (WEIGHTS_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.save_outputs(state.c, state.applied, cfg.strategy, tmp, ema_unet_state=_ema_state(state.ema, state.c))
        shutil.rmtree(weights, ignore_errors=True)
        tmp.rename(weights)
        token = f"{os.getpid()}-{time.time_ns()}"
        (out / SAVED_MARK).write_text(token)
    source, scratch = _weights_to_sample(state, api, out, token)
    try:
        pipe = load_pipeline(cfg.model, source, cfg.sample.scheduler, state.device)
        final = generate(pipe, cfg.sample, cfg.sample_resolution, out / "samples" / "final", device=state.device,
                         mixed_precision=cfg.train.mixed_precision, normalization=cfg.data.normalization,
                         **_sampling_share(api))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if api.rank != 0:
        return result
    (out / SAVED_MARK).unlink(missing_ok=True)
    _log_grid(api, out / "samples" / "final", state.pos.step, final.rows_per_rank)
    if outputs and publish_outputs(out, outputs):
        api.log({"event": "published", "step": state.pos.step, "uri": outputs["uri"], "time": time.time()})
    api.log({"event": "end", "step": state.pos.step, "peak_memory_mb": _peak_memory_mb(state.device),
             "vae_encoder_calls": state.encoder_calls.n if state.encoder_calls is not None else None,
             "text_encoder_calls": state.text_calls.n if state.text_calls is not None else None,
             "time": time.time()})
    return result


def _sampling_share(api: Session) -> dict[str, int]:
    """`generate`'s rank and world size: the worker group's where it has a process group
    (ranks split the prompt x seed rows and gather them on rank 0), else one process."""
    return {"rank": api.rank, "world_size": api.world_size} if _distributed() else {"rank": 0, "world_size": 1}


SAVED_MARK = ".weights-saved"  # rank 0 writes a token here once weights/ is complete


def _weights_to_sample(state: TrainState, api: Session, out: Path, token: str | None) -> tuple[Path, Path | None]:
    """The weights folder this rank loads its sampling pipeline from, and a scratch folder to
    remove afterwards (or None). Rank 0, and ranks that see its trial folder (same node or a
    shared filesystem: they read back the token it wrote), read `out/weights`; any other rank
    saves its own copy with the same saving code into a local scratch folder (after DDP the
    trainable weights, EMA included, are the same on every rank), so that every row is sampled
    from saved files. Waits for rank 0's weights (the token's broadcast)."""
    weights = out / WEIGHTS_DIR
    if api.world_size == 1 or not _distributed():
        return weights, None
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)  # NCCL sends objects from the current device
    sent = [token]
    dist.broadcast_object_list(sent, src=0)
    try:
        if api.rank == 0 or (out / SAVED_MARK).read_text().strip() == sent[0]:
            return weights, None
    except OSError:
        pass
    scratch = Path(tempfile.mkdtemp(prefix="sar-ray-weights-"))
    ckpt.save_outputs(state.c, state.applied, state.cfg.strategy, scratch / WEIGHTS_DIR,
                      ema_unet_state=_ema_state(state.ema, state.c))
    return scratch / WEIGHTS_DIR, scratch


# --------------------------------------------------------------------------------------------
# outputs without a shared filesystem: rank 0 -> the run's storage -> the driver
# --------------------------------------------------------------------------------------------

DRIVER_MARK = ".driver"
OUTPUT_DIRS = (WEIGHTS_DIR, "samples")


def _storage(uri: str):
    from .trial import storage_filesystem

    return storage_filesystem(uri)


def driver_sees(out: Path, token: str) -> bool:
    """Whether this process sees the driver's trial folder: the driver wrote `token` there."""
    try:
        return (out / DRIVER_MARK).read_text().strip() == token
    except OSError:
        return False


def publish_outputs(out: Path, outputs: dict) -> bool:
    """Rank 0: copy weights and samples to `outputs["uri"]` (the Train run's storage: shared by
    definition) unless the driver sees `out` itself. True when copied."""
    if driver_sees(out, outputs["token"]):
        return False
    import pyarrow.fs as pafs

    fs, root = _storage(outputs["uri"])
    for name in OUTPUT_DIRS:
        if (out / name).is_dir():
            fs.create_dir(f"{root}/{name}", recursive=True)
            pafs.copy_files(str(out / name), f"{root}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    return True


def fetch_outputs(out: Path, uri: str) -> None:
    """The driver: replace `out`'s weights and samples by what rank 0 published to `uri`
    (it ran where this folder is not)."""
    import pyarrow.fs as pafs

    fs, root = _storage(uri)
    for name in OUTPUT_DIRS:
        if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound:
            shutil.rmtree(out / name, ignore_errors=True)
            (out / name).mkdir(parents=True)
            pafs.copy_files(f"{root}/{name}", str(out / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())


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


def _report_with_checkpoint(state: TrainState, api: Session, metrics: dict, out: Path) -> None:
    """Phase checkpoint. Every rank reports; rank 0 attaches the resume state. Local mode
    writes it straight into the trial folder (nothing else persists it); otherwise Ray Train
    copies it to storage and keeps the newest `checkpoints_to_keep`."""
    extra = {"slug": state.cfg.strategy.slug, "keep": state.cfg.train.checkpoints_to_keep}
    if api.rank != 0:
        api.report(metrics)
        return
    if api.local_mode:
        target = out / CHECKPOINTS_DIR / f"step-{state.pos.step:06d}"
        state.save(target, extra)
        api.report(metrics, Checkpoint.from_directory(str(target)))
        for p in sorted((out / CHECKPOINTS_DIR).glob("step-*"))[: -extra["keep"]]:
            shutil.rmtree(p, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state.save(Path(tmp), extra)
        api.report(metrics, Checkpoint.from_directory(tmp))


def _load_val_batches(cfg: TrialConfig, device, api: Session, text_cache=None) -> list[Batch]:
    """The validation shard, read once and kept (it is small: `eval_batches` micro-batches).
    The whole shard is iterated so that Ray Data's split iterators stay in step."""
    shard = api.dataset_shard("val") if cfg.data.val_fraction > 0 else None
    if shard is None:
        return []
    batches = []
    for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=False):
        if len(batches) < cfg.train.eval_batches:
            batches.append(_to_batch(batch, device, text_cache))
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


def _validation_samples(c: Components, cfg: TrialConfig, out: Path, device, api: Session):
    """Samples from the live modules (every rank its share of the rows; rank 0 writes them):
    rank 0 gets the `SampleSet`, the other ranks None."""
    from .models import assemble_pipeline
    from .sample import generate

    was = {n: m.training for n, m in c.modules().items()}
    pipe = assemble_pipeline(c, cfg.sample.scheduler)
    got = generate(pipe, cfg.sample, cfg.sample_resolution, out, device=device,
                   mixed_precision=cfg.train.mixed_precision, normalization=cfg.data.normalization,
                   **_sampling_share(api))
    for n, m in c.modules().items():
        m.train(was[n])
    return got


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


def _last_ray_start() -> tuple[str, str] | None:
    """(address, file) of the cluster the last `ray start` on this machine recorded, which
    `ray.init()` without an address joins; None when there is no record."""
    try:
        from ray._private.utils import get_ray_address_file, read_ray_address  # no public call

        address = read_ray_address()
        return (address, get_ray_address_file(None)) if address else None
    except Exception:  # noqa: BLE001 - another Ray layout: leave the choice to ray.init
        return None


def ray_address(address: str | None) -> str | None:
    """What `ray.init` gets: `address`, else RAY_ADDRESS (both probed: unreachable is an error),
    else None (Ray joins the cluster `ray start` recorded, or starts a local one), or "local"
    when that record names a cluster that no longer answers: a cluster killed without `ray stop`
    leaves it, and `ray.init()` would retry it for minutes instead of starting a local Ray."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
        return address
    last = _last_ray_start()
    if last is not None:
        try:
            _probe(last[0], timeout=2.0)
        except RayConnectionError:
            logging.getLogger(__name__).warning(
                "ignoring %s: the Ray cluster it records (%s) does not answer (stopped without `ray stop`?); "
                "starting a local Ray (pass --address or RAY_ADDRESS to join a cluster)", last[1], last[0])
            return "local"
    return None


def connect_ray(address: str | None) -> None:
    """Use a running Ray (address or RAY_ADDRESS), else start a local one."""
    import logging

    # Ray Data prints a progress block per dataset execution; the trial has its own bar.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = ray_address(address)
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
                  name: str | None = None, report_to: str = "train", progress=None,
                  driver_token: str | None = None, text_cache: dict | None = None) -> TorchTrainer:
    """The TorchTrainer of one trial. `name`: its Ray Train run name (a sweep passes
    `<sweep>-<tune trial id>`; default `run_name(cfg)`). `report_to="tune"`: local mode inside a
    Tune trial, where the loop reports to Tune itself (see `session_for`). `progress`: a
    `ProgressChannel` the loop's log records go to (the driver's monitor drains it).
    `driver_token`: what the driver wrote to `out/.driver`; rank 0 publishes its outputs to
    storage where it does not read it back (see `publish_outputs`). `text_cache`: the
    text-embedding cache's table (`data.cache.open_text`), sent to the workers with the config."""
    s = cfg.scaling
    local_mode = s.num_workers == 0
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    storage = s.storage_path or str((out / "ray").resolve())
    name = name or run_name(cfg)
    outputs = None if local_mode or not driver_token else {
        "uri": f"{storage.rstrip('/')}/{name}/outputs", "token": driver_token}
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": str(out.resolve()), "local_mode": local_mode,
                           "materialized": isinstance(datasets.get("train"), MaterializedDataset),
                           "report_to": report_to, "progress": progress, "outputs": outputs,
                           "run_uri": f"{storage.rstrip('/')}/{name}",
                           "text_cache": text_cache,  # data.cache: per-caption text encoder outputs
                           # fault injection reaches workers started before the variable was set
                           "crash_at": int(os.environ.get(CRASH_ENV, "0") or 0)},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=None if local_mode else resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=s.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )
