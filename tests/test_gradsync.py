"""Gradient sync across 2 CPU workers (gloo): DDP over the trainable modules gives the mean of
the ranks' gradients (what the flat all-reduce it replaced computed), with accumulation, and
does not hang when one rank's batch leaves a trainable parameter without a gradient."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _components(sets: list[str]):
    from sar_ray import models
    from sar_ray.config import load
    from sar_ray.strategies import apply

    cfg = load(None, ["model.pretrained=tiny-sd", "data.resolution=32", *sets]).trial()
    torch.manual_seed(0)
    c = models.build_tiny("sd")
    applied = apply(c, cfg.strategy, cfg.train.lr)
    return cfg, c, applied


def _batch(rank: int, micro: int, drop_all: bool):
    from sar_ray.diffusion import Batch

    g = torch.Generator().manual_seed(100 * rank + micro)
    b = Batch(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, [f"<SAR> scene {rank} {micro}", "<SAR> a ship"])
    b.drop = torch.ones(2, dtype=torch.bool) if drop_all else None
    return b


def _grads(sets, rank, world, use_ddp: bool, accum: int, drop_rank: int | None):
    from sar_ray.diffusion import compute_loss
    from sar_ray.train import GradSync

    cfg, c, applied = _components(sets)
    params = applied.trainable_parameters()
    sync = GradSync(c, applied, cfg, torch.device("cpu")) if use_ddp else None
    for micro in range(accum):
        batch = _batch(rank, micro, drop_all=rank == drop_rank)
        gen = torch.Generator().manual_seed(7 * rank + micro)
        last = micro == accum - 1
        if sync is not None:
            with sync.accumulating(last):
                out = sync.forward(compute_loss, c, batch, cfg.train, gen, False, 32)
                (out.loss / accum).backward()
        else:
            out = compute_loss(c, batch, cfg.train, gen, False, 32)
            (out.loss / accum).backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    if sync is None:  # the reference: the mean of every rank's gradient
        for g in grads:
            dist.all_reduce(g)
            g /= world
    return grads


def _worker(rank: int, world: int, port: int, cases, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (sets, accum, drop_rank) in enumerate(cases):
            ref = _grads(sets, rank, world, use_ddp=False, accum=accum, drop_rank=drop_rank)
            got = _grads(sets, rank, world, use_ddp=True, accum=accum, drop_rank=drop_rank)
            worst = max(float((a - b).abs().max()) for a, b in zip(ref, got))
            scale = max(float(a.abs().max()) for a in ref)
            out_q.put((i, rank, worst, scale, len(ref)))
    finally:
        dist.destroy_process_group()


def _run(cases):
    """Every case in one pair of processes (starting them costs more than the cases)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, cases, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "gradient sync hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [q.get(timeout=5) for _ in procs for _ in cases]


CASES = [
    # LoRA UNet + LoRA text encoder + learned token, two micro-batches per step
    (["strategy.unet.mode=lora", "strategy.text_encoder.mode=lora", "strategy.token=learn"], 2, None),
    # full UNet, one micro-batch
    (["strategy.unet.mode=full"], 1, None),
    # rank 1 drops every caption: the "<SAR>" row gets no gradient there; DDP must not hang
    (["strategy.unet.mode=frozen", "strategy.token=learn"], 1, 1),
]


def test_ddp_gradients_equal_the_mean_of_the_ranks_gradients():
    results = _run(CASES)
    assert sorted((i, r) for i, r, *_ in results) == [(i, r) for i in range(len(CASES)) for r in (0, 1)]
    for i, rank, worst, scale, n in results:
        assert n > 0 and scale > 0, CASES[i]
        assert worst <= 1e-5 * max(scale, 1.0), (CASES[i], rank, worst, scale)
