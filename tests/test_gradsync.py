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


def _weights(sets, rank, world, use_ddp: bool, steps: int):
    """The trainable weights after `steps` AdamW steps, each on this rank's own batch."""
    from sar_ray.diffusion import compute_loss
    from sar_ray.train import GradSync

    cfg, c, applied = _components(sets)
    params = applied.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    sync = GradSync(c, applied, cfg, torch.device("cpu")) if use_ddp else None
    for step in range(steps):
        batch = _batch(rank, step, drop_all=False)
        gen = torch.Generator().manual_seed(7 * rank + step)
        if sync is not None:
            with sync.accumulating(True):
                sync.forward(compute_loss, c, batch, cfg.train, gen, False, 32).loss.backward()
        else:
            compute_loss(c, batch, cfg.train, gen, False, 32).loss.backward()
            for p in params:  # the sync DDP replaced: the mean of the ranks' gradients
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


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
        sets, steps = WEIGHTS_CASE
        ref = _weights(sets, rank, world, use_ddp=False, steps=steps)
        got = _weights(sets, rank, world, use_ddp=True, steps=steps)
        start = _components(sets)[2].trainable_parameters()
        worst = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        moved = max(float((a - s0).abs().max()) for a, s0 in zip(got, start))
        out_q.put(("weights", rank, worst, moved, [t.sum().item() for t in got]))
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
    return [q.get(timeout=5) for _ in procs for _ in [*cases, WEIGHTS_CASE]]


CASES = [
    # LoRA UNet + LoRA text encoder + learned token, two micro-batches per step
    (["strategy.unet.mode=lora", "strategy.text_encoder.mode=lora", "strategy.token=learn"], 2, None),
    # full UNet, one micro-batch
    (["strategy.unet.mode=full"], 1, None),
    # rank 1 drops every caption: the "<SAR>" row gets no gradient there; DDP must not hang
    (["strategy.unet.mode=frozen", "strategy.token=learn"], 1, 1),
]


# Full UNet + LoRA text encoder + learned token, 3 optimizer steps on each rank's own batches.
WEIGHTS_CASE = (["strategy.unet.mode=full", "strategy.text_encoder.mode=lora", "strategy.token=learn"], 3)


@pytest.fixture(scope="module")
def synced():
    """One process pair runs every gradient case, then the weights case."""
    return _run(CASES)


def test_ddp_gradients_equal_the_mean_of_the_ranks_gradients(synced):
    results = [r for r in synced if r[0] != "weights"]
    assert sorted((i, r) for i, r, *_ in results) == [(i, r) for i in range(len(CASES)) for r in (0, 1)]
    for i, rank, worst, scale, n in results:
        assert n > 0 and scale > 0, CASES[i]
        assert worst <= 1e-5 * max(scale, 1.0), (CASES[i], rank, worst, scale)


def test_after_n_steps_the_weights_equal_those_of_the_flat_sync_on_every_rank(synced):
    """Identical weights after N steps: DDP's bucketed all-reduce during backward against the
    flat mean of the ranks' gradients it replaced (within fp tolerance), and the same on both
    ranks, after the weights moved."""
    weights = {rank: (worst, moved, sums) for tag, rank, worst, moved, sums in synced if tag == "weights"}
    assert sorted(weights) == [0, 1]
    for rank, (worst, moved, _) in weights.items():
        assert moved > 1e-4, (rank, moved)  # the steps changed the weights
        assert worst <= 1e-5, (rank, worst)
    assert weights[0][2] == pytest.approx(weights[1][2], rel=1e-6, abs=1e-6)  # the ranks agree
