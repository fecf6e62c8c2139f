"""GPU check: a study's base strategy trained at full size on one GPU, then sampled; no Ray, no MLflow.

    bash tests/bench/gpu_check.sh                                  # on a GPU machine (installs carried .whl/)
    python tests/bench/gpu_check.py --config sweeps/paper.yaml     # the same, packages already installed
    python tests/bench/gpu_check.py --tiny --device cpu            # dry run of the same code: tiny SDXL, 64 px

1. Model: the components of the study's model family (SDXL for sweeps/paper.yaml) built from
   the public configs shipped in sar_ray/model_configs/ (`models.public_config`) with random
   weights, straight on the device: no download, nothing loaded. Then what `train.worker_loop`
   does: frozen weights in `model.weight_dtype`, fully tuned components and an upcast VAE in
   fp32, `strategies.apply`, placement, train modes, gradient checkpointing, AdamW.
2. Training: synthetic SAR scenes (`data.synth`: land-cover layouts with gamma speckle,
   captions "<SAR> image of ..."), normalised as the study says, at `data.resolution`;
   `diffusion.compute_loss`, backward, clip, step, for `--warmup` + `--steps` optimizer steps of
   `train.grad_accum` micro-batches of `--batch` images. Timed after the warm-up, with
   torch.cuda.synchronize at each step end. No lr schedule, no validation, no checkpoints.
3. Numbers: images/s; MFU = useful FLOP/s / 790 TFLOP/s (an H200's dense bf16 peak): useful
   FLOPs per image = 3 x the forward FLOPs (forward + backward) of the UNet and of every text
   encoder a gradient passes through, 1 x those of a frozen text encoder and of the VAE encoder
   (3 x the decoder when the VAE trains), counted once with torch.utils.flop_counter on one
   image. Gradient checkpointing's recomputed forward is not counted: it is not useful work.
   Peak memory is torch.cuda.max_memory_allocated over the training steps, beside the estimate
   of `sar_ray.plan` (`sar-ray validate --plan`) for the same trial on one worker.
4. Sampling: `models.assemble_pipeline` around the trained modules and `sample.generate` (the
   study's sampler, guidance and mixed precision) for `--samples` images; ok or the error.

The summary is printed as "key: value" lines and written as JSON to --out. Exit code 0 when
training kept a finite loss and sampling succeeded, 1 otherwise, 2 on bad input.

It sets a strategy up with the same Ray-free functions as the training loop
(`strategies.place`, `strategies.enable_checkpointing`, `strategies.make_optimizer`).
Not a test: pytest does not collect this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# Nothing is downloaded: the models come from shipped configs, the tokenizer from open_clip's BPE.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from sar_ray import config as config_lib  # noqa: E402
from sar_ray import diffusion, models, strategies  # noqa: E402
from sar_ray.config import TrialConfig  # noqa: E402

PEAK_FLOPS = 790e12  # H200 dense bf16, measured here on an 8192^3 matmul (788 TFLOP/s)
GiB = 2**30  # "GB" below, as in sar_ray.plan


# --------------------------------------------------------------------------------------------
# arguments and the trial
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "sweeps" / "paper.yaml"),
                   help="study file (default: sweeps/paper.yaml)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 50; --tiny: 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 5; --tiny: 2)")
    p.add_argument("--batch", type=int, default=None, help="images per micro-batch (default: train.batch_size)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: data.resolution; --tiny: 64)")
    p.add_argument("--samples", type=int, default=4, help="images to sample after training (default 4)")
    p.add_argument("--sample-steps", type=int, default=20, help="denoising steps per sample (default 20)")
    p.add_argument("--tiny", action="store_true",
                   help="dry run: the tiny model of the family (models.TINY_SIZES) at 64 px, e.g. on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="summary JSON (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.tiny else 50  # a dry run checks the path, not the speed: minutes on 2 cores
    if args.warmup is None:
        args.warmup = 2 if args.tiny else 5
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"
    if min(args.steps, args.samples, args.sample_steps) < 1 or args.warmup < 0:
        p.error("--steps, --samples and --sample-steps must be >= 1, --warmup >= 0")
    return args


def family_of(pretrained: str) -> str:
    """sd15 | sd2 | sdxl for a tiny name or a hub id (what sar_ray.plan assumes, too)."""
    if pretrained in models.TINY:
        return models.TINY[pretrained]
    low = pretrained.lower()
    return "sdxl" if "xl" in low else "sd2" if "stable-diffusion-2" in low else "sd15"


def load_study(path: str) -> config_lib.StudyConfig:
    """`config.load` without the search section: load checks every search point through
    sar_ray.sweep, which imports Ray Tune; this check runs the base trial alone."""
    raw = config_lib.load_raw(path)
    raw.pop("search", None)
    try:
        return config_lib.StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise config_lib.ConfigError(config_lib.format_validation_error(e, path, config_lib.StudyConfig)) from None


def load_trial(args) -> tuple[TrialConfig, TrialConfig]:
    """(the study's base trial with --batch / --resolution applied, the same on one worker for
    the memory plan: no gradient sync buffer, as in this single-process run)."""
    study = load_study(args.config)
    base = study.trial()
    resolution = args.resolution if args.resolution is not None else 64 if args.tiny else base.data.resolution
    updates = {"train.batch_size": args.batch if args.batch is not None else base.train.batch_size,
               "data.resolution": resolution}
    if args.tiny:
        updates["model.pretrained"] = f"tiny-{family_of(base.model.pretrained)}"
    if args.tiny or args.resolution is not None:
        updates["sample.resolution"] = None  # sample at the resolution trained here
    try:
        return study.trial(**updates), study.trial(**updates, **{"scaling.num_workers": 1})
    except ValidationError as e:
        source = f"{args.config} (with --batch / --resolution)"
        raise config_lib.ConfigError(config_lib.format_validation_error(e, source, TrialConfig)) from None


# --------------------------------------------------------------------------------------------
# the model: public configs, random weights, on the device
# --------------------------------------------------------------------------------------------


def build_components(cfg: TrialConfig, family: str, tiny: bool, device: torch.device) -> models.Components:
    """Random components of `family` from its public configs (TINY_SIZES applied with `tiny`),
    built on `device` and cast as `models.load_components` loads them: `model.weight_dtype`
    except fully tuned components and the VAE under `model.vae_force_upcast` (fp32)."""
    sizes = models.TINY_SIZES[family] if tiny else {}
    keep_fp32 = strategies.full_components(cfg.strategy)
    te_names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]

    def conf(name: str) -> dict:
        return {**models.public_config(family, name), **sizes.get(name, {})}

    def dtype(name: str) -> torch.dtype:
        if name in keep_fp32 or (name == "vae" and cfg.model.vae_force_upcast):
            return torch.float32
        return models.DTYPES[cfg.model.weight_dtype]

    seed = cfg.train.seed
    with torch.device(device):  # random init on the device: 14 GB of fp32 SDXL weights in seconds
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(conf("unet"))
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(conf("vae"))
        encoders: list[nn.Module] = []
        for name in te_names:
            torch.manual_seed(seed)
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**conf(name))))
    for name, m in zip(["unet", "vae", *te_names], [unet, vae, *encoders]):
        models.cast_module(m, dtype(name))
        m.eval()
    tokenizers = [models.clip_tokenizer(pad_token=models.public_config(family, n.replace("text_encoder", "tokenizer"))
                                        ["pad_token"]) for n in te_names]
    scheduler = DDPMScheduler.from_config(models.public_config(family, "scheduler"))
    if cfg.model.prediction_type and cfg.model.prediction_type != scheduler.config.prediction_type:
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=cfg.model.prediction_type)
    c = models.Components(
        kind="sdxl" if family == "sdxl" else "sd", unet=unet, vae=vae, text_encoders=encoders,
        tokenizers=tokenizers, noise_scheduler=scheduler,
        source=f"{'tiny' if tiny else 'full-size'} {family}, random weights", family=family,
        force_zeros_for_empty_prompt=bool(
            models.public_config(family, "model_index").get("force_zeros_for_empty_prompt")),
    )
    models.pool_at_eos(c)  # as load_components: pool at <|endoftext|>, not at the added <SAR> id
    return c


def set_up_training(c: models.Components, cfg: TrialConfig, device: torch.device) -> strategies.Applied:
    """What worker_loop does between loading and the first step."""
    applied = strategies.apply(c, cfg.strategy, cfg.train.lr)
    strategies.place(c, applied, device, cfg.model.weight_dtype, cfg.model.vae_force_upcast)
    token = cfg.strategy.token == "learn"
    for name, module in c.modules().items():
        module.train(applied.modes.get(name, "frozen") != "frozen" or (name.startswith("text_encoder") and token))
    if cfg.train.gradient_checkpointing:
        strategies.enable_checkpointing(c, applied, token)
    return applied


# --------------------------------------------------------------------------------------------
# data: synthetic SAR scenes
# --------------------------------------------------------------------------------------------


def synthetic_batches(cfg: TrialConfig, n_batches: int, device: torch.device) -> list[diffusion.Batch]:
    """`n_batches` micro-batches of synthetic SAR at `data.resolution`, normalised as training
    normalises real scenes, on `device` (made once: the timed loop measures the model, not numpy)."""
    from sar_ray.data.dataset import prepare_image, to_pixel_values, with_prefix
    from sar_ray.data.synth import generate_scene
    from sar_ray.train import model_pixels

    rng = np.random.default_rng(cfg.train.seed)
    r, b = cfg.data.resolution, cfg.train.batch_size
    batches = []
    for _ in range(n_batches):
        pixels, captions = [], []
        for _ in range(b):
            amplitude, caption, _label = generate_scene(rng, r, looks=4)  # (R, R) linear, "<SAR> image of ..."
            img = prepare_image(amplitude, cfg.data.normalization, r)  # (R, R) in [0, 1]
            pixels.append(to_pixel_values(img))  # (1, R, R) uint16, as the trainer's rows hold it
            captions.append(with_prefix(caption, cfg.data.caption_prefix))
        # The narrow array goes to the device and is widened there, as in the trainer's _to_batch.
        batches.append(diffusion.Batch(model_pixels(torch.from_numpy(np.stack(pixels)).to(device)), captions))  # (B, 3, R, R)
    return batches


# --------------------------------------------------------------------------------------------
# useful FLOPs per image
# --------------------------------------------------------------------------------------------


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def flops_per_image(c: models.Components, cfg: TrialConfig, applied: strategies.Applied, batch: diffusion.Batch,
                    device: torch.device) -> tuple[int, dict[str, int]]:
    """(useful training FLOPs per image, forward FLOPs by component), counted on one image.

    Under no_grad gradient checkpointing is inactive: each forward is counted once.
    """
    one = diffusion.Batch(batch.pixels[:1], batch.captions[:1])
    r = cfg.data.resolution
    g = torch.Generator().manual_seed(0)
    fwd: dict[str, int] = {}
    latents: list[torch.Tensor] = []
    fwd["vae_encoder"] = _count(lambda: latents.append(diffusion.encode_latents(c.vae, one.pixels, g)))
    ids = models.tokenize(c, one.captions)
    with diffusion.autocast(device, cfg.train.mixed_precision):
        for name, te, x in zip(c.text_encoder_names, c.text_encoders, ids):
            fwd[name] = _count(lambda: te(x.to(device), output_hidden_states=True))
        prompt_embeds, added = diffusion.conditioning(c, one, r)  # (1, 77, D), SDXL added_cond_kwargs
        t = torch.full((1,), 500, device=device, dtype=torch.long)
        fwd["unet"] = _count(lambda: c.unet(latents[0], t, prompt_embeds, added_cond_kwargs=added, return_dict=False))
    if applied.modes.get("vae", "frozen") != "frozen":
        fwd["vae_decoder"] = _count(lambda: diffusion.decode_latents(c.vae, latents[0]))
    token = cfg.strategy.token == "learn"
    grad_through = {"unet", "vae_decoder"} | {n for n in c.text_encoder_names
                                              if token or applied.modes.get(n, "frozen") != "frozen"}
    useful = sum((3 if name in grad_through else 1) * f for name, f in fwd.items())
    return useful, fwd


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phase(c: models.Components, cfg: TrialConfig, applied: strategies.Applied, batches: list[diffusion.Batch],
                args, device: torch.device) -> dict:
    """The training steps; step times after the warm-up, peak memory, the last loss."""
    t = cfg.train
    params = applied.trainable_parameters()
    optimizer = strategies.make_optimizer(applied, cfg)
    tune_vae = applied.modes.get("vae", "frozen") != "frozen"
    generator = torch.Generator().manual_seed(t.seed * 1000 + 1)  # rank 0's stream, as worker_loop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, micro = [], [], 0
    optimizer.zero_grad(set_to_none=True)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for _ in range(t.grad_accum):
            batch = batches[micro % len(batches)]
            micro += 1
            drop = torch.rand(len(batch.captions), generator=generator) < cfg.data.caption_dropout  # (B,)
            batch = dataclasses.replace(batch, drop=drop if cfg.data.caption_dropout > 0 else None)
            out = diffusion.compute_loss(c, batch, t, generator, tune_vae, cfg.data.resolution)
            (out.loss / t.grad_accum).backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        _sync(device)  # the step is done when the GPU is
        times.append(time.perf_counter() - t0)
        if step == 0 or (step + 1) % 10 == 0:
            print(f"  step {step + 1}/{args.warmup + args.steps}: {1e3 * times[-1]:.0f} ms, "
                  f"loss {float(losses[-1]):.4f}", flush=True)
    timed = times[args.warmup:]
    images = t.batch_size * t.grad_accum * len(timed)
    res = {
        "step_ms": 1e3 * statistics.median(timed),
        "first_step_ms": 1e3 * times[0],
        "images_per_s": images / sum(timed),
        "last_loss": float(losses[-1]),
        "loss_finite": all(math.isfinite(float(x)) for x in losses),
    }
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / GiB
        res["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GiB
    return res  # the optimizer state goes with this frame: sampling runs without it


def plan_phase(plan_cfg: TrialConfig) -> dict:
    """`sar_ray.plan`'s estimate for this trial on one worker, or the reason there is none."""
    try:
        from sar_ray.plan import plan_trial
    except ImportError as e:
        return {"plan": f"n/a ({e})"}
    try:
        p = plan_trial(plan_cfg)
    except Exception as e:  # noqa: BLE001 - the check goes on without a plan
        return {"plan": f"n/a ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"}
    return {"plan_total_gb": p.total / GiB, "plan_lower_bound_gb": p.lower_bound / GiB,
            "plan_activations_gb": (p.activations or 0) / GiB}


def sample_phase(c: models.Components, cfg: TrialConfig, args, device: torch.device) -> dict:
    """`sample.generate` on a pipeline around the trained modules: ok or the one-line error."""
    from sar_ray import sample

    seeds = list(cfg.sample.seeds[: args.samples]) or [0]
    n_prompts = math.ceil(args.samples / len(seeds))
    prompts = [cfg.sample.prompts[i % len(cfg.sample.prompts)] for i in range(n_prompts)]
    scfg = cfg.sample.model_copy(update={"prompts": prompts, "seeds": seeds, "steps": args.sample_steps})
    n = len(prompts) * len(seeds)
    res: dict = {"sample_images": n, "sample_steps": args.sample_steps, "sampling_ok": False}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        pipe = models.assemble_pipeline(c, cfg.sample.scheduler)
        with tempfile.TemporaryDirectory(prefix="gpu-check-samples-") as out_dir:
            got = sample.generate(pipe, scfg, cfg.sample_resolution, out_dir, device=device,
                                  mixed_precision=cfg.train.mixed_precision)
            _sync(device)
            res["sampling_ok"] = len(got.images) == n
            if not res["sampling_ok"]:
                res["sampling_error"] = f"{len(got.images)} images written, {n} asked for"
    except Exception as e:  # noqa: BLE001 - reported, not raised: the training numbers still count
        res["sampling_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    seconds = time.perf_counter() - t0
    if res["sampling_ok"]:
        res["sample_s_per_image"] = seconds / n
        res["sample_images_per_s"] = n / seconds
    if device.type == "cuda":
        res["sampling_peak_gb"] = torch.cuda.max_memory_allocated(device) / GiB
    return res


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:.1f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU visible to torch; use --tiny --device cpu for a dry run", file=sys.stderr)
        return 2
    try:
        cfg, plan_cfg = load_trial(args)
    except config_lib.ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    family = family_of(cfg.model.pretrained)
    t, r = cfg.train, cfg.data.resolution
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check: {args.config}, {cfg.strategy.slug}; torch {torch.__version__} on {gpu}", flush=True)

    t0 = time.perf_counter()
    c = build_components(cfg, family, args.tiny, device)
    applied = set_up_training(c, cfg, device)
    build_s = time.perf_counter() - t0
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in c.modules().items()}
    print(f"model: {c.source}: " + ", ".join(f"{n} {v / 1e6:.1f} M" for n, v in counts.items())
          + f"; {applied.num_trainable() / 1e6:.1f} M trainable; built in {build_s:.1f} s", flush=True)
    print(f"train: {r} px, batch {t.batch_size} x grad_accum {t.grad_accum}, {t.mixed_precision} autocast, "
          f"weights {cfg.model.weight_dtype}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}, "
          f"{t.optimizer}; {args.warmup} warm-up + {args.steps} timed steps", flush=True)

    batches = synthetic_batches(cfg, max(1, min(t.grad_accum, 4)), device)
    useful, fwd = flops_per_image(c, cfg, applied, batches[0], device)
    print("forward TFLOPs per image: " + ", ".join(f"{n} {f / 1e12:.3g}" for n, f in fwd.items())
          + f"; useful training TFLOPs per image {useful / 1e12:.3g} (3 x forward where a gradient passes; "
          "checkpointing's recomputation not counted)", flush=True)

    summary: dict = {"config": args.config, "strategy": cfg.strategy.slug, "device": gpu, "model": c.source,
                     "resolution": r, "batch": t.batch_size, "grad_accum": t.grad_accum, "timed_steps": args.steps,
                     "build_s": build_s, "train_tflops_per_image": useful / 1e12}
    try:
        summary.update(train_phase(c, cfg, applied, batches, args, device))
    except torch.cuda.OutOfMemoryError as e:
        summary["train_error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
    if "images_per_s" in summary:
        summary["mfu_pct"] = (100 * useful * summary["images_per_s"] / PEAK_FLOPS
                              if device.type == "cuda" else "n/a (not a GPU)")
    summary.update(plan_phase(plan_cfg))
    if args.tiny and "plan_total_gb" in summary:
        summary["plan_note"] = f"planned at the size of the real {family} model (sar_ray.plan), not the tiny one"
    summary.update(sample_phase(c, cfg, args, device))
    summary["wall_s"] = time.perf_counter() - t_start

    print("\n== gpu_check summary ==")
    keys = ["device", "strategy", "resolution", "batch", "grad_accum", "images_per_s", "step_ms", "first_step_ms",
            "mfu_pct", "train_tflops_per_image", "peak_memory_gb", "peak_reserved_gb", "plan_total_gb",
            "plan_lower_bound_gb", "plan_activations_gb", "plan", "plan_note", "last_loss", "train_error",
            "sampling_ok", "sampling_error", "sample_images", "sample_s_per_image", "sample_images_per_s",
            "sampling_peak_gb", "build_s", "wall_s"]
    if device.type != "cuda":
        summary.setdefault("peak_memory_gb", "n/a (not a GPU)")
    for k in keys:
        if k in summary:
            print(f"{k}: {_fmt(summary[k])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out}")
    ok = summary.get("loss_finite", False) and summary["sampling_ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
