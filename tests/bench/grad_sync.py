"""Gradient sync across 2 CPU workers (gloo): DDP over the trainable modules (sar-ray's
`train.GradSync`, bucketed all-reduce during backward, gradients as bucket views) against
the flat all-reduce it replaced (backward, then every gradient copied into one flat buffer,
all-reduced, copied back).

    python tests/bench/grad_sync.py                        # tiny-sd full UNet, 64 px, batch 4, 5 rounds
    python tests/bench/grad_sync.py --strategy lora --rounds 7

Both variants run in the same two processes, interleaved round by round on the same
components and batches, so machine noise hits both alike. Prints per round the median step
time of each, the ratio ddp/flat per round and its median and spread (min..max), and the
extra memory of each sync: the flat copy's size (what the old path allocated on every step)
against DDP's, which keeps gradients inside its buckets (no copy). Goal: ratio <= 1.0, no
extra buffer. On 2 shared cores the overlap of communication with backward is small (gloo
on one machine is fast); the memory saving is exact.

Not a test: pytest does not collect this file.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def flat_allreduce(params: list[torch.nn.Parameter]) -> int:
    """The old sync: returns the bytes of the flat buffer it allocated."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
    return flat.numel() * flat.element_size()


def worker(rank: int, port: int, args, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from sar_ray import models
    from sar_ray.config import load
    from sar_ray.diffusion import Batch, compute_loss
    from sar_ray.strategies import apply, make_optimizer
    from sar_ray.train import GradSync

    cfg = load(None, [f"strategy.unet.mode={args.strategy}", f"data.resolution={args.resolution}"]).trial()
    torch.manual_seed(0)
    c = models.build_tiny("sd")
    applied = apply(c, cfg.strategy, cfg.train.lr)
    params = applied.trainable_parameters()
    opt = make_optimizer(applied, cfg)
    sync = GradSync(c, applied, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(rank)
    batch = Batch(torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1,
                  ["<SAR> a scene"] * args.batch_size)

    def step(variant: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(1)
        if variant == "ddp":
            out = sync.forward(compute_loss, c, batch, cfg.train, gen, False, args.resolution)
            out.loss.backward()
            extra = 0
        else:
            compute_loss(c, batch, cfg.train, gen, False, args.resolution).loss.backward()
            extra = flat_allreduce(params)
        opt.step()
        opt.zero_grad(set_to_none=False)  # DDP's bucket views stay in place (set_to_none would drop them)
        return time.perf_counter() - t0, extra

    for variant in ("flat", "ddp"):  # warm-up
        step(variant)
    for r in range(args.rounds):
        for variant in (("flat", "ddp") if r % 2 == 0 else ("ddp", "flat")):
            times, extra = [], 0
            for _ in range(args.steps):
                t, extra = step(variant)
                times.append(t)
            if rank == 0:
                out_q.put((r, variant, statistics.median(times), extra))
    if rank == 0:
        out_q.put(("params", sum(p.numel() for p in params)))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", default="full", choices=["full", "lora"])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    rows: dict[int, dict[str, tuple[float, int]]] = {}
    n_params = None
    while n_params is None:
        item = q.get(timeout=1800)
        if item[0] == "params":
            n_params = item[1]
        else:
            rows.setdefault(item[0], {})[item[1]] = (item[2], item[3])
    for p in procs:
        p.join()
    print(f"2 gloo workers, tiny-sd unet={args.strategy}, {n_params / 1e6:.2f} M trainable params, "
          f"{args.resolution} px, batch {args.batch_size}/worker, {args.steps} steps x {args.rounds} rounds")
    print(f"{'round':>5} {'flat s/step':>12} {'ddp s/step':>11} {'ddp/flat':>9}")
    ratios = []
    for r in sorted(rows):
        flat, ddp = rows[r]["flat"][0], rows[r]["ddp"][0]
        ratios.append(ddp / flat)
        print(f"{r:>5} {flat:12.3f} {ddp:11.3f} {ddp / flat:9.3f}")
    flat_extra = rows[0]["flat"][1]
    print(f"ddp/flat step time: median {statistics.median(ratios):.3f}, spread {min(ratios):.3f}..{max(ratios):.3f} "
          f"(goal <= 1.0)")
    print(f"extra gradient buffer per step: flat {flat_extra / 2**20:.1f} MiB, ddp 0 MiB (gradients are bucket views)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
