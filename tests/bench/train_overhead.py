"""Training-step overhead of sar-ray against a plain diffusers loop, and an SDXL UNet step on a GPU.

    python tests/bench/train_overhead.py                     # tiny-sd, 64 px, batch 4, 3 rounds: ~2-3 min on 2 cores
    python tests/bench/train_overhead.py --model tiny-sdxl --strategy unet=full,text_encoder=lora,token=learn
    python tests/bench/train_overhead.py --sdxl-full --resolution 1024 --dtype bf16   # GPU only

1. Tiny model (default). On the same components, data, strategy, batch size and steps, in one
   process and one run:
     (a) plain   a loop written with torch/diffusers primitives on in-memory tensors
                 (vae.encode * scaling_factor, noise, timesteps, add_noise, text encoder, UNet,
                 min-SNR MSE, backward, clip, AdamW, lr schedule), what diffusers'
                 train_text_to_image.py does per step (captions tokenised once, up front);
     (b) local   `sar_ray.trial.run_trial` with scaling.num_workers=0 (Ray Train local mode, in
                 this process);
     (c) ray     the same with scaling.num_workers=1 (one Ray Train worker process).
   Step time is the median of consecutive step-end deltas over the same window (steps
   warmup+1 .. steps) for all three, pooled over `--rounds` interleaved rounds; (b) and (c) read
   them from the worker's train_log.jsonl (`time` of every logged step, train.log_every=1).
   Eval and checkpoint run only at the last step, after its log line, so they stay outside the
   window. Goal: (b)/(a) and (c)/(a) <= 1.10. The fixed costs users also see are printed
   apart: time to the model being built and to the first step (data, Ray Train start, model
   build), the tail after the last step and the whole trial's wall time (final eval,
   checkpoint, saved weights, the final sample). ray.init is paid once, before all runs.

   Threads. Ray sets OMP_NUM_THREADS in a worker process to its CPU reservation (the probe task
   below prints it), so a Ray Train worker with the default scaling.cpus_per_worker=1 runs
   torch on ONE thread, while local mode and a plain script default to every core. Every side
   gets `--threads` (default 1): torch.set_num_threads in this process for (a) and (b),
   scaling.cpus_per_worker for (c). One thread is also the fast and stable choice for a tiny
   model on a small shared machine: the model is too small to split, and a second OpenMP
   thread that must wait for a busy core makes each small op slower, not faster.

2. `--sdxl-full` (GPU only; refuses on CPU). A random-weight SDXL base 1.0 UNet (2.57 B
   parameters, its config written out below, no download) trained on random 4-channel latents
   at resolution/8 with random (B, 77, 2048) text embeddings, (B, 1280) pooled embeddings and
   time ids: the UNet step only (no VAE, no text encoders). `--dtype bf16` is bf16 autocast
   over fp32 master weights (what sar-ray's train.mixed_precision=bf16 does); fp32 is plain
   fp32 with TF32 off. Prints images/s and torch.cuda.max_memory_allocated.

Not a test: pytest does not collect this file. Exits 0 whether or not the goal is met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# No hub access (tiny models come from constructors); no uv runtime env for Ray workers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL = 1.10

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers UNet2DConditionModel),
# every key that differs from the constructor's defaults plus the main shape keys.
# `attention_head_dim` is diffusers' historical name for the number of heads (64 channels each).
SDXL_UNET_CONFIG = dict(
    sample_size=128,  # latent side: 1024 px / 8
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280) hidden states
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled 1280
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_UNET_PARAMS = 2_567_463_684  # parameter count of the released SDXL base UNet


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (tiny: 40, sdxl-full: 20)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (tiny: 10, sdxl-full: 5)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (tiny: 4, sdxl-full: 1)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (tiny: 64, sdxl-full: 1024)")
    p.add_argument("--model", choices=["tiny-sd", "tiny-sdxl"], default="tiny-sd")
    p.add_argument(
        "--strategy", default="unet=lora",
        help="comma-separated COMPONENT=MODE (unet, text_encoder, text_encoder_2, vae; frozen|full|lora) "
        "and token=learn|none, e.g. unet=full,text_encoder=lora,token=learn (default: unet=lora)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="fp32, or bf16 autocast over fp32 master weights (tiny: fp32, sdxl-full: bf16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every side (default 1: what a Ray Train worker gets with the default "
                   "scaling.cpus_per_worker=1, and it leaves the other cores to Ray Data and Ray)")
    p.add_argument("--images", type=int, default=200, help="synthetic scenes (10%% held out for validation)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="tiny comparison device")
    p.add_argument("--only", default="a,b,c", help="which of a,b,c to run (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (b), (c) (default: 3)")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary folder, removed)")
    p.add_argument("--sdxl-full", action="store_true", help="full-size random SDXL UNet step on a GPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="sdxl-full: UNet gradient checkpointing")
    p.add_argument("--lora-rank", type=int, default=4, help="sdxl-full with unet=lora: LoRA rank")
    args = p.parse_args(argv)
    big = args.sdxl_full
    for name, tiny, full in (("steps", 40, 20), ("warmup", 10, 5), ("batch_size", 4, 1),
                             ("resolution", 64, 1024), ("dtype", "fp32", "bf16")):
        if getattr(args, name) is None:
            setattr(args, name, full if big else tiny)
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1")
    if args.warmup < 1 or args.steps < args.warmup + 2:
        p.error(f"need --warmup >= 1 and --steps >= warmup + 2 (got steps {args.steps}, warmup {args.warmup})")
    if args.resolution % 8:
        p.error(f"--resolution must be a multiple of 8 (got {args.resolution})")
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not args.only <= {"a", "b", "c"} or not args.only:
        p.error(f"--only takes a comma-separated subset of a,b,c (got {args.only})")
    return args


def strategy_sets(spec: str) -> list[str]:
    """`unet=full,text_encoder=lora,token=learn` -> config overrides."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--strategy {spec!r}: {item!r} is not COMPONENT=MODE")
        out.append(f"strategy.{key}={value}" if key == "token" else f"strategy.{key}.mode={value}")
    return out


# --------------------------------------------------------------------------------------------
# runs and their step times
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    t_call: float  # time.time() when the run was started
    step_times: dict[int, float]  # step -> time.time() at its end (after the optimizer step)
    t_model: float | None = None  # model built ("start" event of the worker)
    t_end: float | None = None  # run_trial returned

    def deltas(self, first: int, last: int) -> list[float]:
        """Durations of steps first..last (each the gap to the previous step's end)."""
        return [self.step_times[s] - self.step_times[s - 1] for s in range(first, last + 1)]

    @property
    def first_step(self) -> float:
        return self.step_times[min(self.step_times)] - self.t_call


def trial_config(args, out: Path, num_workers: int, threads: int):
    from sar_ray import config

    sets = [
        f"model.pretrained={args.model}",
        f"data.resolution={args.resolution}",
        f"data.synthetic.size={max(64, args.resolution)}",
        f"data.synthetic.n={args.images}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        "train.log_every=1",
        # Eval and checkpoint only at the last step: after its log line, outside the window.
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.eval_batches=1",
        f"train.mixed_precision={'bf16' if args.dtype == 'bf16' else repr('no')}",  # quoted: YAML reads no as false
        'sample.prompts=["<SAR> image of a forest"]',
        "sample.seeds=[0]",
        "sample.steps=1",
        "tracking.enabled=false",
        f"scaling.num_workers={num_workers}",
        f"scaling.cpus_per_worker={threads}",
        f"scaling.use_gpu={'true' if args.device == 'cuda' else 'false'}",
        f"out={out}",
        *strategy_sets(args.strategy),
    ]
    return config.load(None, sets).trial()


def plain_loop(args, cfg, device: torch.device) -> Run:
    """(a): the step written out with torch/diffusers primitives on in-memory tensors."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    from sar_ray.data.dataset import load_folder_arrays, split_records, with_prefix
    from sar_ray.data.dataset import to_pixel_values
    from sar_ray.data.synth import synthetic_path
    from sar_ray.models import build_tiny
    from sar_ray.strategies import apply
    from sar_ray.train import model_pixels

    t = cfg.train
    run = Run("a", time.time(), {})
    # The same images the trial trains on: its train split, normalised, resized, centre-cropped.
    arrays, records = load_folder_arrays(synthetic_path(cfg.data.synthetic), cfg.data.normalization, cfg.data.resolution)
    train_recs, _ = split_records(records, cfg.data.val_fraction)
    keep = {id(r) for r in train_recs}
    rows = [(a, with_prefix(r.text, cfg.data.caption_prefix)) for a, r in zip(arrays, records) if id(r) in keep]
    # As the trainer's rows hold them: one channel of uint16, widened to 3 x float32 on the device.
    pixels_all = torch.from_numpy(np.stack([to_pixel_values(a) for a, _ in rows]))  # (N, 1, R, R) uint16
    captions_all = [c for _, c in rows]

    torch.manual_seed(t.seed)
    c = build_tiny(args.model)
    applied = apply(c, cfg.strategy, t.lr)  # the same parameters train as in the trial
    text_trains = cfg.strategy.token == "learn" or any(
        applied.modes.get(n, "frozen") != "frozen" for n in c.text_encoder_names
    )
    for name, m in c.modules().items():
        m.to(device)
        m.train(applied.modes.get(name, "frozen") != "frozen" or (name.startswith("text_encoder") and cfg.strategy.token == "learn"))
    params = applied.trainable_parameters()
    opt = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"]} for g in applied.param_groups],
        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
    )
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    sched = c.noise_scheduler
    # Tokenised once, up front (diffusers' scripts tokenise in the dataset transform).
    ids_all = [tok(captions_all, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in c.tokenizers]
    time_ids = torch.tensor([args.resolution, args.resolution, 0, 0, args.resolution, args.resolution],
                            dtype=torch.float32, device=device).repeat(args.batch_size, 1)  # (B, 6)
    gen = torch.Generator().manual_seed(t.seed * 1000 + 1)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else torch.autocast(device.type, enabled=False))
    n_batches = len(captions_all) // args.batch_size
    run.t_model = time.time()

    for step in range(1, args.steps + 1):
        i = ((step - 1) % n_batches) * args.batch_size
        pixels = model_pixels(pixels_all[i : i + args.batch_size].to(device))  # (B, 3, R, R) in [-1, 1]
        ids = [x[i : i + args.batch_size].to(device) for x in ids_all]  # [(B, 77)]
        with amp:
            with torch.no_grad():
                latents = c.vae.encode(pixels).latent_dist.sample(generator=gen).float()
                latents = latents * c.vae.config.scaling_factor  # (B, 4, R/8, R/8)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
            noisy = sched.add_noise(latents, noise, timesteps)
            with torch.set_grad_enabled(text_trains):
                if c.kind == "sd":
                    cond, added = c.text_encoders[0](ids[0])[0], None  # (B, 77, D)
                else:
                    outs = [te(x, output_hidden_states=True) for te, x in zip(c.text_encoders, ids)]
                    cond = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)  # (B, 77, D1 + D2)
                    added = {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}
            pred = c.unet(noisy, timesteps, cond, added_cond_kwargs=added, return_dict=False)[0]
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
            per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if t.min_snr_gamma is not None:
                snr = compute_snr(sched, timesteps)
                w = torch.clamp(snr, max=t.min_snr_gamma) / (snr if sched.config.prediction_type == "epsilon" else snr + 1)
                loss = (per_sample * w.to(per_sample.device)).mean()
            else:
                loss = per_sample.mean()
        loss.backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trial reads the loss every step (a host sync on GPU)
        run.step_times[step] = time.time()
    run.t_end = time.time()
    return run


def sar_ray_run(name: str, cfg) -> Run:
    """(b)/(c): a whole trial; step times from the worker's train_log.jsonl."""
    from sar_ray.train import LOG_FILE
    from sar_ray.trial import read_log, run_trial

    run = Run(name, time.time(), {})
    result = run_trial(cfg, fresh=True, progress=False)
    run.t_end = time.time()
    for rec in read_log(result.out / LOG_FILE):
        if rec.get("event") == "start":
            run.t_model = rec["time"]
        elif "loss" in rec:
            run.step_times[int(rec["step"])] = rec["time"]
    return run


def worker_threads_probe(threads: int) -> tuple[str | None, int]:
    """(OMP_NUM_THREADS, torch threads) in a Ray worker process reserving `threads` CPUs."""
    import ray

    # max_calls=1: a fresh process each time; torch fixes its thread count when first used,
    # from OMP_NUM_THREADS as Ray set it for the first task that process ran.
    @ray.remote(num_cpus=threads, max_calls=1)
    def probe():
        import os

        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    return ray.get(probe.remote())


def tiny_comparison(args) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads
    torch.set_num_threads(threads)  # (a) and (b) run in this process
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU here", file=sys.stderr)
        return 2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sar-ray-overhead-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(work)  # the synthetic-data cache (.sar-ray-cache) lands here
    try:
        return _compare(args, work, threads, cores, device)
    finally:
        os.chdir(here)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _compare(args, work: Path, threads: int, cores: int, device: torch.device) -> int:
    import ray
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from sar_ray.data.synth import synthetic_path
    from sar_ray.train import connect_ray

    # Library chatter in this process (local mode, the final sample) would break up the table.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    labels = {"a": "plain loop", "b": "trial, local mode (num_workers=0)", "c": "trial, Ray Train (num_workers=1)"}
    cfgs = {k: trial_config(args, work / f"run-{k}", {"a": 0, "b": 0, "c": 1}[k], threads) for k in labels}
    cfg = cfgs["a"]

    t = time.perf_counter()
    synthetic_path(cfg.data.synthetic)  # written once, before any timing
    t_data = time.perf_counter() - t
    t = time.perf_counter()
    connect_ray(None)  # as `sar-ray trial` does: a local Ray with every core
    t_ray = time.perf_counter() - t
    ray_cpus = int(ray.cluster_resources().get("CPU", 0))
    if "c" in args.only and threads > ray_cpus:
        print(f"--threads {threads}: the local Ray has only {ray_cpus} CPUs for the worker", file=sys.stderr)
        return 2
    omp, worker_t = worker_threads_probe(threads) if "c" in args.only else (None, None)
    omp1, worker_t1 = worker_threads_probe(1) if "c" in args.only and threads != 1 else (omp, worker_t)

    print(f"model {args.model}, strategy {cfg.strategy.slug}, {args.resolution} px, batch {args.batch_size}, "
          f"{args.steps} steps (median over steps {args.warmup + 1}..{args.steps}), dtype {args.dtype}, device {device}")
    print(f"threads: {threads} of {cores} cores; (a), (b) torch.set_num_threads({threads}) in this process "
          f"(now {torch.get_num_threads()}); (c) scaling.cpus_per_worker={threads}")
    if "c" in args.only:
        print(f"  a Ray worker reserving {threads} CPU(s) gets OMP_NUM_THREADS={omp} -> torch threads {worker_t}; "
              f"with the default cpus_per_worker=1: OMP_NUM_THREADS={omp1} -> {worker_t1} thread(s)")
    print(f"setup outside every run: synthetic data {t_data:.1f} s, ray.init {t_ray:.1f} s ({ray_cpus} CPUs); "
          f"outputs in {work}")
    sys.stdout.flush()

    # Rounds interleave (a), (b), (c), so that load from other processes drifts over all alike.
    runs: dict[str, list[Run]] = {k: [] for k in ("a", "b", "c") if k in args.only}
    for rnd in range(1, args.rounds + 1):
        for key in runs:
            print(f"round {rnd}/{args.rounds}: ({key}) {labels[key]} ...", flush=True)
            run = plain_loop(args, cfgs[key], device) if key == "a" else sar_ray_run(key, cfgs[key])
            missing = sorted(set(range(1, args.steps + 1)) - set(run.step_times))
            if missing:
                print(f"({key}): no step time logged for steps {missing[:5]}...", file=sys.stderr)
                return 1
            runs[key].append(run)

    first, last = args.warmup + 1, args.steps
    # Pooled over rounds: the median of every step in the window of every round.
    pooled = {k: np.asarray([d for r in rs for d in r.deltas(first, last)]) for k, rs in runs.items()}
    med = {k: float(np.median(d)) for k, d in pooled.items()}
    print()
    print(f"{'':38s} {'step ms':>8s} {'p25-p75 ms':>13s} {'img/s':>7s} {'/ (a)':>6s} "
          f"{'model s':>8s} {'1st step s':>10s} {'tail s':>7s} {'wall s':>7s}")
    for k, rs in runs.items():
        d = pooled[k] * 1e3
        ratio = f"{med[k] / med['a']:6.3f}" if "a" in med else "   n/a"

        def mid(f):  # fixed costs: median over rounds
            return statistics.median(f(r) for r in rs)

        print(f"({k}) {labels[k]:34s} {1e3 * med[k]:8.1f} {np.percentile(d, 25):6.1f}-{np.percentile(d, 75):<6.1f} "
              f"{args.batch_size / med[k]:7.1f} {ratio} {mid(lambda r: r.t_model - r.t_call):8.1f} "
              f"{mid(lambda r: r.first_step):10.1f} {mid(lambda r: r.t_end - r.step_times[last]):7.1f} "
              f"{mid(lambda r: r.t_end - r.t_call):7.1f}")
    print(f"  step ms: median step time over steps {first}..{last} of {args.rounds} round(s); fixed costs are "
          "medians over rounds: model s: call -> model built (data, Ray Train start, build, apply); 1st step s: "
          "call -> end of step 1; tail s: after the last step (final eval, checkpoint, weights, sample, "
          "teardown); wall s: the whole run")
    if "a" in med:
        for k in ("b", "c"):
            if k in med:
                ratio = med[k] / med["a"]
                per_round = ", ".join(
                    f"{statistics.median(rk.deltas(first, last)) / statistics.median(ra.deltas(first, last)):.3f}"
                    for ra, rk in zip(runs["a"], runs[k])
                )
                verdict = "PASS" if ratio <= GOAL else "MISS"
                print(f"({k})/(a) steady-state step time: {ratio:.3f}  {verdict} (goal <= {GOAL:.2f}; "
                      f"{1e3 * (med[k] - med['a']):+.1f} ms/step; per round: {per_round})")
    return 0


# --------------------------------------------------------------------------------------------
# full-size SDXL UNet on a GPU
# --------------------------------------------------------------------------------------------


def sdxl_full(args) -> int:
    if not torch.cuda.is_available():
        print("--sdxl-full needs a CUDA GPU: a 2.6 B-parameter SDXL UNet training step at 1024 px does not run "
              "on a CPU in useful time. Run it on a GPU machine, or drop --sdxl-full for the tiny CPU comparison.",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (bf16 autocast is unaffected)
    torch.backends.cudnn.allow_tf32 = False
    return unet_step_bench(args, torch.device("cuda"), SDXL_UNET_CONFIG, SDXL_UNET_PARAMS)


def unet_step_bench(args, device: torch.device, unet_config: dict, reference_params: int | None = None) -> int:
    """Train a randomly initialised UNet of `unet_config` (SDXL-style text_time conditioning)
    on random latents and embeddings; print images/s and peak memory."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sar_ray.config import ComponentStrategy
    from sar_ray.strategies import STRATEGIES

    modes = dict(s.split("=", 1) for s in args.strategy.split(",") if "=" in s)
    unet_mode = modes.get("unet", "full")
    if unet_mode not in ("full", "lora"):
        print(f"--sdxl-full trains the UNet: --strategy unet=full|lora (got {unet_mode})", file=sys.stderr)
        return 2
    ignored = sorted(k for k, v in modes.items() if k != "unet" and v not in ("frozen", "none"))
    cuda = device.type == "cuda"
    latent, bsz = args.resolution // 8, args.batch_size
    cond_dim = unet_config["cross_attention_dim"]
    pooled_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # random init straight on the device (10 GB of fp32 weights for SDXL)
        unet = UNet2DConditionModel(**unet_config)
    n_params = sum(p.numel() for p in unet.parameters())
    # sar-ray's own strategies: full = every weight fp32 and trainable; lora = adapters (fp32)
    # on the attention projections, base weights frozen (left in fp32 here).
    strategy = ComponentStrategy(mode=unet_mode, rank=args.lora_rank)
    params = STRATEGIES[unet_mode](unet, strategy, "unet")
    unet.to(device)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)  # sar-ray's make_optimizer defaults
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    t_build = time.perf_counter() - t0
    attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else torch.autocast(device.type, enabled=False))

    check = ""
    if reference_params is not None:
        check = f" ({'matches' if n_params == reference_params else 'DIFFERS FROM'} the released {reference_params / 1e9:.3f} B)"
    print(f"SDXL base 1.0 UNet config, random weights: {n_params / 1e9:.3f} B parameters{check}, built in "
          f"{t_build:.1f} s; attention {', '.join(attn)}")
    print(f"UNet {unet_mode}{f' (LoRA rank {args.lora_rank})' if unet_mode == 'lora' else ''}: "
          f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable; "
          f"{'bf16 autocast over fp32 master weights' if args.dtype == 'bf16' else 'fp32 (TF32 off)'}; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; AdamW, grad clip 1.0")
    print(f"{args.resolution} px -> latents (B, 4, {latent}, {latent}), batch {bsz}: the UNet step only (VAE and "
          f"text encoders skipped: random latents, (B, 77, {cond_dim}) text and (B, {pooled_dim}) pooled "
          f"embeddings, time ids)" + (f"; --strategy {', '.join(ignored)} ignored here" if ignored else ""))
    print(f"{torch.cuda.get_device_name(device) if cuda else device}; {args.steps} steps, median over steps "
          f"{args.warmup + 1}..{args.steps}", flush=True)

    g = torch.Generator(device).manual_seed(0)
    # Fixed conditioning: what the two text encoders would hand the UNet.
    cond = torch.randn(bsz, 77, cond_dim, generator=g, device=device)  # (B, 77, 2048)
    pooled = torch.randn(bsz, pooled_dim, generator=g, device=device)  # (B, 1280)
    time_ids = torch.tensor([args.resolution, args.resolution, 0, 0, args.resolution, args.resolution],
                            dtype=torch.float32, device=device).repeat(bsz, 1)  # (B, 6)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for _ in range(args.steps):
            t = time.perf_counter()
            latents = torch.randn(bsz, 4, latent, latent, generator=g, device=device)  # (B, 4, R/8, R/8)
            noise = torch.randn(latents.shape, generator=g, device=device)
            timesteps = torch.randint(0, 1000, (bsz,), generator=g, device=device)
            noisy = sched.add_noise(latents, noise, timesteps)
            with amp:
                pred = unet(noisy, timesteps, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                            return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)  # the step is done when the GPU is
            times.append(time.perf_counter() - t)
    except torch.cuda.OutOfMemoryError:
        print(f"out of GPU memory at batch {bsz}, {args.resolution} px after {len(times)} steps; try "
              f"--gradient-checkpointing or a smaller --batch-size", file=sys.stderr)
        return 1
    step = statistics.median(times[args.warmup:])
    memory = "n/a on CPU"
    if cuda:
        memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB "
                  f"(max reserved {torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB)")
    print(f"step {1e3 * step:.0f} ms (median; first step {1e3 * times[0]:.0f} ms), {bsz / step:.2f} images/s, "
          f"peak memory (torch.cuda.max_memory_allocated) {memory}, last loss {float(loss):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from sar_ray.config import ConfigError

    args = parse_args(argv)
    try:
        return sdxl_full(args) if args.sdxl_full else tiny_comparison(args)
    except ConfigError as e:  # e.g. a bad --strategy
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
