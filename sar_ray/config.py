"""Typed configuration of a study: one YAML file whose base sections are a complete trial.

``load("sweeps/x.yaml", ["train.lr=1e-4"])`` returns a validated, frozen :class:`StudyConfig`.
Every model rejects unknown keys and wrong types; errors name the file and the field path:

    sweeps/x.yaml: strategy.unet.rank: must be > 0 (got -4)

Library code receives the section it needs (``cfg.data``, ``cfg.strategy.unet``), never the
whole namespace, so a function's signature says what it depends on.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def cache_home() -> Path:
    """sar-ray's cache folder: $SAR_RAY_CACHE, else $XDG_CACHE_HOME/sar-ray, else ~/.cache/sar-ray.
    Tiny natural bases (`models`), the CLIP BPE files (`clip-bpe`) and, by default, the reference
    descriptors (`eval`) live under it, so one variable moves them all (a cluster's shared disk)."""
    return Path(_cache_home_spec()).expanduser()


def _cache_home_spec() -> str:
    return os.environ.get("SAR_RAY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "sar-ray")


def default_eval_cache() -> str:
    """`eval.cache_dir`'s default: `eval` under :func:`cache_home`, with a leading ``~`` kept as is,
    so each node of a cluster expands it to its own home where the cache is used."""
    return os.path.join(_cache_home_spec(), "eval")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file, field and fix."""


class _Strict(BaseModel):
    # extra="forbid": a typo such as `strategy.unet.rnak` must fail, not silently use a default.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    pretrained: str = Field(
        "tiny-sdxl",
        description="Hub id or local directory of a diffusers StableDiffusion (1.x/2.x) or "
        "StableDiffusionXL pipeline, or `tiny-sd15` (alias `tiny-sd`) / `tiny-sd2` / `tiny-sdxl` "
        "(random small models with the public configs of SD 1.5 / 2.1 / SDXL base except widths "
        "and depths, built from constructors, no download), or `tiny-sdxl-natural` (likewise "
        "`tiny-sd15-natural`, `tiny-sd2-natural`): that tiny model pretrained on the photographs "
        "shipped with scikit-image, built on first use in about two minutes and cached under "
        "~/.cache/sar-ray/models ($SAR_RAY_CACHE/models).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weight variant to load, e.g. `fp16`.")
    weight_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32",
        description="dtype of the frozen weights (VAE, frozen encoders). Trainable parameters "
        "always stay fp32.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type (default: the model's own)."
    )
    vae_force_upcast: bool = Field(
        True, description="Run the VAE in fp32 (SDXL's VAE overflows in fp16)."
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class SynthConfig(_Strict):
    n: int = Field(200, gt=0, description="Number of synthetic scenes.")
    size: int = Field(64, ge=16, description="Side of each synthetic scene in pixels.")
    seed: int = Field(0, description="Generator seed; the same seed writes the same scenes.")
    looks: int = Field(4, gt=0, description="Number of looks L of the Gamma speckle.")


class NormalizationConfig(_Strict):
    method: Literal["reference", "db", "percentile", "none"] = Field(
        "reference",
        description="`reference`: A / (mean + k*std) of the linear amplitude, clipped to [0, 1] "
        "(the reference study); `db`: 20*log10(A) clipped to [db_min, db_max] and rescaled; "
        "`percentile`: clip to [p_low, p_high] percentiles and rescale; `none`: pixel / the file's "
        "full scale (255 for 8-bit, 65535 for 16-bit samples, 4095 for a TIFF whose BitsPerSample is 12; "
        "floats already in [0, 1] as they are).",
    )
    bits: int | None = Field(
        None, ge=1, le=16,
        description="`none`: the samples' real depth where the files do not record it, e.g. 12 for 12-bit "
        "data in 16-bit PNGs: every image is divided by 2**bits - 1 (4095) instead of the stored depth's "
        "full scale (65535, which would leave the images 16x too dark). A file storing fewer bits or floats, "
        "or a pixel above 2**bits - 1, is an error that data.on_corrupt=skip does not skip. "
        "`sar-ray data inspect` says when a dataset's 16-bit samples use fewer bits.",
    )
    k: float = Field(3.0, gt=0, description="`reference`: number of standard deviations k.")
    db_min: float = Field(-30.0, description="`db`: lower clipping bound in dB.")
    db_max: float = Field(0.0, description="`db`: upper clipping bound in dB.")
    p_low: float = Field(1.0, ge=0, lt=100, description="`percentile`: lower percentile.")
    p_high: float = Field(99.0, gt=0, le=100, description="`percentile`: upper percentile.")
    input: Literal["amplitude", "intensity"] = Field(
        "amplitude", description="Whether pixel values are amplitude |s| or intensity |s|^2."
    )

    @model_validator(mode="after")
    def _ranges(self) -> NormalizationConfig:
        if self.db_min >= self.db_max:
            raise ValueError(f"db_min must be < db_max (got {self.db_min} >= {self.db_max})")
        if self.p_low >= self.p_high:
            raise ValueError(f"p_low must be < p_high (got {self.p_low} >= {self.p_high})")
        return self


def text_columns(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`data.text_column` (one column name, or a list of them) as a tuple of names."""
    return (value,) if isinstance(value, str) else tuple(value)


class DataConfig(_Strict):
    path: str = Field(
        "synthetic",
        description="A folder of images (imagefolder layout with metadata.jsonl, or a captions "
        "CSV/Parquet inside), a CSV or Parquet file with image and text columns, WebDataset "
        "shards (one `.tar`, a folder of them, a brace pattern `shard-{000000..000519}.tar`, or "
        "an `s3://` prefix; Parquet tables may be on `s3://` too), or `synthetic` for the "
        "embedded synthetic SAR scenes (see `data.synthetic`).",
    )
    captions: str | None = Field(
        None,
        description="Caption file (metadata.jsonl, .csv or .parquet); relative paths are taken "
        "from `data.path`. Default: found in the folder.",
    )
    image_column: str = Field(
        "file_name",
        description="Column holding the image path (or bytes, in Parquet); for WebDataset the "
        "sample member, e.g. `sar.npy` (complex64 SLC, read as amplitude |s|) or `sar.png`.",
    )
    text_column: str | list[str] = Field(
        "text",
        description="Column holding the caption; for WebDataset a dotted path into the "
        "sample's JSON member (SARLO-80: `caption.MID`) or a `.txt` member. A list (SARLO-80: "
        "`[caption.SHORT, caption.MID, caption.LONG]`): every image needs all of them; training "
        "samples one per image and epoch by a stable hash of (image, epoch, `train.seed`), so "
        "a resumed trial picks the same ones; validation always uses the same one per image "
        "(a hash of its name), so its loss compares across steps and trials.",
    )
    synthetic: SynthConfig = Field(default_factory=SynthConfig)
    resolution: int = Field(64, ge=8, description="Training side length in pixels.")
    crop: Literal["center", "random"] = Field(
        "center",
        description="After resizing the shorter side to `resolution`: center crop, or a random "
        "square crop (position drawn per image from `train.seed`).",
    )
    flip: bool = Field(False, description="Random horizontal flips during training.")
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    caption_prefix: str | None = Field(
        "<SAR>",
        description="Prefix added to every caption that does not already start with it "
        "(null: leave captions as they are). With `strategy.token: learn` this must equal "
        "`strategy.token_string`.",
    )
    caption_dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability of replacing a caption with the empty string."
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the images kept out of training for the validation loss "
        "(by a hash of each image's name: the same images in every trial and seed)."
    )
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the images held out of training, validation and the "
        "reference (the next slice of the same name hash): a sweep scores them against the reference as the "
        "`real (held out)` anchor row, the distance real SAR of this source has. 0: no anchor from "
        "data.path (search.holdout may still give one). WebDataset / streamed Parquet sources keep every "
        "non-validation image for training: their anchor comes from search.holdout only.",
    )
    max_images: int | None = Field(None, gt=0, description="Use at most this many images.")
    materialize: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Keep the prepared images in Ray's object store before training starts "
        "(`auto`: when they take under 2 GiB). Streaming (`never`) suits datasets larger than "
        "memory but needs CPUs beyond those the training workers reserve.",
    )
    on_corrupt: Literal["skip", "error"] = Field(
        "skip",
        description="A corrupt or unreadable image: `skip` it and count it, or `error` with its "
        "path.",
    )
    cache: Literal["auto", "off"] = Field(
        "off",
        description="The shared latent and text caches: `auto` encodes every training image once with the "
        "frozen VAE encoder (a Ray Data job; under `scaling.storage_path`/latents, else "
        ".sar-ray-cache/latents) and trials that do not tune the VAE read the stored posteriors "
        "instead of pixels (no encoder call per step); and every distinct caption once with the frozen "
        "text encoders (under `scaling.storage_path`/text, else .sar-ray-cache/text), which trials whose "
        "text encoders are all frozen and whose token is not learned read instead of encoding; `off`: "
        "every step encodes its pixels and captions.",
    )

    @property
    def text_columns(self) -> tuple[str, ...]:
        """Every caption column; more than one: training samples one per image and epoch."""
        return text_columns(self.text_column)

    @model_validator(mode="after")
    def _splits_leave_training(self) -> DataConfig:
        if self.val_fraction + self.holdout_fraction >= 1:
            raise ValueError(f"val_fraction + holdout_fraction must be < 1 so that some images train "
                             f"(got {self.val_fraction} + {self.holdout_fraction})")
        return self

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v):
        # YAML 1.1 reads a bare `off` as false: `data.cache: off` means "off".
        return "off" if v is False else v

    @field_validator("text_column")
    @classmethod
    def _text_column(cls, v: str | list[str]) -> str | list[str]:
        names = text_columns(v)
        if not names or not all(n.strip() for n in names):
            raise ValueError(f"needs a column name or a non-empty list of them (got {v!r})")
        return v


# --------------------------------------------------------------------------------------------
# strategy
# --------------------------------------------------------------------------------------------

Mode = Literal["frozen", "full", "lora"]


class ComponentStrategy(_Strict):
    mode: Mode = Field("frozen", description="`frozen`, `full` fine-tuning, or `lora`.")
    rank: int = Field(4, description="LoRA rank r (> 0).")
    alpha: float | None = Field(None, description="LoRA alpha (default: equal to rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names LoRA wraps (default: attention projections of the component).",
    )
    lr: float | None = Field(None, description="Learning rate (default: `train.lr`).")

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be > 0 (got {v})")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0 (got {v})")
        return v

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class StrategyConfig(_Strict):
    unet: ComponentStrategy = Field(
        default_factory=lambda: ComponentStrategy(mode="lora"), description="UNet strategy."
    )
    text_encoder: ComponentStrategy = Field(
        default_factory=ComponentStrategy,
        description="Text encoder strategy; for SDXL it applies to both encoders unless "
        "`text_encoder_2` is set.",
    )
    text_encoder_2: ComponentStrategy | None = Field(
        None, description="SDXL only: strategy of the second (OpenCLIP bigG) text encoder."
    )
    vae: ComponentStrategy = Field(
        default_factory=ComponentStrategy,
        description="VAE strategy: a tuned VAE trains its decoder only, on the frozen encoder's "
        "latents, with L1 on log-amplitude plus a local-variance (speckle) term.",
    )
    token: Literal["none", "learn"] = Field(
        "none", description="`learn`: add `token_string` to the tokenizer(s) and train its row."
    )
    token_string: str = Field("<SAR>", description="The placeholder token.")
    token_init: str = Field(
        "radar", description="Word whose embedding initialises the new token's row."
    )
    token_lr: float | None = Field(None, gt=0, description="Token learning rate (default: train.lr).")

    def text_encoder_strategies(self, n_encoders: int) -> list[ComponentStrategy]:
        """The strategy of each text encoder (SD: one, SDXL: two)."""
        second = self.text_encoder_2 or self.text_encoder
        return [self.text_encoder, second][:n_encoders]

    @property
    def slug(self) -> str:
        """Deterministic short name of the trial's strategy, e.g. `unet-full_te-lora4_vae-frozen_tok`
        (a LoRA component with its rank): run names, output folders, the live table."""
        return self._name(ranks=True)

    @property
    def combination(self) -> str:
        """The slug without LoRA ranks, e.g. `unet-full_te-lora_vae-frozen_tok`: the strategy
        combination, as `report.md` and the sweep's summary name it (a rank is one of its
        search dimensions, shown with the trial's sampled values)."""
        return self._name(ranks=False)

    def _name(self, ranks: bool) -> str:
        def part(name: str, c: ComponentStrategy) -> str:
            return f"{name}-{c.mode}" + (f"{c.rank}" if ranks and c.mode == "lora" else "")

        parts = [part("unet", self.unet), part("te", self.text_encoder)]
        if self.text_encoder_2 is not None:
            parts.append(part("te2", self.text_encoder_2))
        parts.append(part("vae", self.vae))
        if self.token == "learn":
            parts.append("tok")
        return "_".join(parts)

    @model_validator(mode="after")
    def _something_trains(self) -> StrategyConfig:
        comps = [self.unet, self.text_encoder, self.vae] + (
            [self.text_encoder_2] if self.text_encoder_2 else []
        )
        if all(c.mode == "frozen" for c in comps) and self.token == "none":
            raise ValueError(
                "every component is frozen and token is none: nothing would train; set e.g. "
                "strategy.unet.mode=lora"
            )
        if not re.fullmatch(r"\S+", self.token_string):
            raise ValueError(f"token_string must be one word without spaces (got {self.token_string!r})")
        return self


# --------------------------------------------------------------------------------------------
# train / sample / scaling / tracking / eval
# --------------------------------------------------------------------------------------------


class EmaConfig(_Strict):
    enabled: bool = Field(False, description="Keep an EMA of fully tuned weights (full mode only).")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay.")


class TrainConfig(_Strict):
    lr: float = Field(1e-4, gt=0, description="Learning rate of components without their own.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Images per worker per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seed: int = Field(0, description="Seed of weights init, data order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast dtype; trainable parameters stay fp32."
    )
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory: the UNet whenever a gradient passes through it, "
        "and every text encoder that trains."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients (null: off).")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="`adamw8bit` needs bitsandbytes (falls back to adamw with a warning)."
    )
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_snr_gamma: float | None = Field(
        5.0, gt=0, description="Min-SNR loss weighting gamma (null: plain MSE)."
    )
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (0: off).")
    vae_loss_weight: float = Field(
        1.0, ge=0, description="Weight of the VAE decoder's loss (log-amplitude L1 + local variance) "
        "when the VAE is tuned."
    )
    ema: EmaConfig = Field(default_factory=EmaConfig)
    eval_every: int = Field(50, gt=0, description="Validation loss every N steps (and at the end).")
    eval_batches: int = Field(4, gt=0, description="Validation micro-batches per evaluation.")
    checkpoint_every: int = Field(50, gt=0, description="Resume checkpoint every N steps.")
    checkpoints_to_keep: int = Field(2, gt=0, description="Newest resume checkpoints kept.")
    sample_every: int = Field(0, ge=0, description="Validation samples every N steps (0: only at the end).")
    log_every: int = Field(1, gt=0, description="Log the training loss every N steps.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` (in a file or `--set train.mixed_precision=no`) as false.
        return "no" if v is False else v


class SampleConfig(_Strict):
    prompts: list[str] = Field(
        default_factory=lambda: [
            "<SAR> image of open water with a ship",
            "<SAR> image of agricultural fields",
            "<SAR> image of a forest",
            "<SAR> image of an urban area",
        ],
        min_length=1,
        description="Fixed evaluation prompts.",
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1, description="One image per prompt x seed.")
    scheduler: Literal["dpm++", "euler", "ddim"] = Field("dpm++", description="Sampling scheduler.")
    steps: int = Field(20, gt=0, description="Denoising steps.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale.")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    resolution: int | None = Field(None, ge=8, description="Sample side (default: data.resolution).")
    save_tiff: bool = Field(False, description="Also write float32 amplitude TIFFs.")


class ScalingSection(_Strict):
    num_workers: int = Field(
        0, ge=0, description="0: run in-process (Ray Train local mode); N: N DDP workers."
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1, gt=0, description="GPUs per worker when use_gpu.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="GPU memory per worker in GB (e.g. 80 for A100/H100 80 GB); `validate --plan` warns where the estimate exceeds it and sweep/trial refuse a study whose lower bound (weights, gradients, optimizer state) alone exceeds it.")
    address: str | None = Field(
        None, description="Ray address (default: RAY_ADDRESS, else a local Ray)."
    )
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts after a worker dies (Ray Train FailureConfig): Train "
        "restarts the group in place from the newest reported checkpoint, inside the same trial (no Tune "
        "retry needed). A NaN loss is not retried into training (it fails at once on restart)."
    )
    storage_path: str | None = Field(
        None, description="Ray Train storage for checkpoints (default: <out>/ray). Shared "
        "storage (s3://, gs://, NFS) on a cluster."
    )


class TrackingConfig(_Strict):
    enabled: bool = Field(True, description="Log to MLflow.")
    uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    )
    experiment: str = Field("sar-ray", description="MLflow experiment name.")
    log_checkpoints: bool = Field(False, description="Also upload resume checkpoints as artifacts.")

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class EvalConfig(_Strict):
    metrics: list[str] = Field(
        default_factory=lambda: ["stats", "glcm"], min_length=1,
        description="Metric families to compute (sar_ray.metrics.families: stats, glcm, clip).",
    )
    clip: str | None = Field(
        None, description="Directory of a SAR-CLIP model from `sar-ray clip train` (needed by `clip`)."
    )
    normalization: NormalizationConfig = Field(
        default_factory=NormalizationConfig,
        description="Normalisation of the reference images; use the training's data.normalization "
        "so that real and generated images are compared in the space the model learned.",
    )
    generated_normalized: bool | Literal["auto"] = Field(
        "auto",
        description="auto: a sample folder written by sar-ray (it holds samples.json) is the model's "
        "[0, 1] amplitude and only rescaled to [0, 1]; any other generated set (e.g. real SAR) is "
        "normalised like the reference. true / false: always the one or the other.",
    )
    size: int | None = Field(
        None, ge=8, description="Compare images at size x size (default: the first reference "
        "image's size); other sizes are resized with a warning."
    )
    max_images: int | None = Field(
        None, gt=0, description="Use at most this many images per set: a sample seeded by eval.seed and "
        "stratified by label (each class its proportional share, at least one), not the first N of the listing "
        "(WebDataset shards: the first N in shard order, as listing them reads every member header).",
    )
    cache_dir: str | None = Field(
        default_factory=default_eval_cache,
        description="Where the reference set's descriptors are kept (default: `eval` under sar-ray's cache, "
        "$SAR_RAY_CACHE or ~/.cache/sar-ray, resolved where the config is built), keyed by the "
        "reference files (paths, sizes, mtimes), the eval settings that change them and the descriptor code, "
        "so trials scored against one reference describe it once; null: no cache.",
    )
    hist_bins: int = Field(256, ge=8, description="Amplitude histogram bins (KL, JS).")
    hist_smoothing: float = Field(
        0.5, ge=0, description="Pseudo-count added to every histogram bin before KL (0: none)."
    )
    per_class: bool = Field(
        True, description="Also amplitude distances per class (label column, or generated "
        "prompts equal to reference captions)."
    )
    enl_window: int | None = Field(
        None, ge=4, description="ENL block side in pixels (default: min(side // 8, 16), >= 4)."
    )
    enl_fraction: float = Field(
        0.25, gt=0, le=1, description="Fraction of the most homogeneous blocks used for ENL."
    )
    glcm_levels: int = Field(64, ge=2, le=256, description="GLCM grey levels.")
    glcm_distances: list[int] = Field(
        default_factory=lambda: [1, 2, 4], min_length=1, description="GLCM pixel distances (> 0)."
    )
    glcm_angles: list[float] = Field(
        default_factory=lambda: [0.0, 45.0, 90.0, 135.0], min_length=1, description="Degrees."
    )
    glcm_symmetric: bool = Field(True, description="Count (i, j) and (j, i) pairs (skimage symmetric=True).")
    batch_size: int = Field(32, gt=0, description="Images per Ray Data batch (CPU descriptors).")
    clip_batch_size: int = Field(
        64, gt=0, description="Images per SAR-CLIP embedding batch on a GPU (on CPUs: batch_size)."
    )
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size (capped at the set sizes).")
    kid_subsets: int = Field(100, gt=0, description="KID random subsets.")
    bootstrap: int = Field(
        200, ge=0, description="Bootstrap resamples of the generated images for the 95% interval of "
        "every metric (0: no intervals)."
    )
    seed: int = Field(0, description="Seed of the max_images sample, the KID subsets and the bootstrap resamples.")

    @field_validator("metrics")
    @classmethod
    def _known_families(cls, v: list[str]) -> list[str]:
        from sar_ray.metrics.families import FAMILIES  # the registry; numpy-only, imported on use

        unknown = [m for m in v if m not in FAMILIES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(FAMILIES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown metric family {unknown[0]!r}{hint}; valid: {', '.join(FAMILIES)}")
        return v

    @field_validator("glcm_distances")
    @classmethod
    def _positive_distances(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError(f"GLCM distances must be > 0 (got {v})")
        return v

    @model_validator(mode="after")
    def _clip_model_given(self) -> EvalConfig:
        if "clip" in self.metrics and self.clip is None:
            raise ValueError("metrics include clip: set eval.clip to a `sar-ray clip train` folder")
        return self


# --------------------------------------------------------------------------------------------
# top level
# --------------------------------------------------------------------------------------------


class TrialConfig(_Strict):
    name: str = Field("trial", description="Study name; used in run names and output folders.")
    out: str | None = Field(None, description="Output folder (default: runs/<name>/<strategy>).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _token_is_used(self) -> TrialConfig:
        s = self.strategy
        if s.token != "learn":
            return self
        if self.data.caption_prefix != s.token_string:
            raise ValueError(
                f"strategy.token=learn: data.caption_prefix ({self.data.caption_prefix!r}) must be "
                f"strategy.token_string ({s.token_string!r}) so that training captions contain the learned "
                f"token (captions that already start with it are left as they are)"
            )
        if not any(s.token_string in p for p in self.sample.prompts):
            raise ValueError(
                f"strategy.token=learn: no sample.prompts entry contains {s.token_string!r}, so the learned "
                f"token would never be used when this trial is sampled and scored; start the prompts with it"
            )
        return self

    @model_validator(mode="after")
    def _precision_works(self) -> TrialConfig:
        if self.model.weight_dtype != "fp32" and self.train.mixed_precision == "no":
            raise ValueError(
                f"model.weight_dtype={self.model.weight_dtype} needs train.mixed_precision="
                f"{'bf16' if self.model.weight_dtype == 'bf16' else 'fp16'} (frozen {self.model.weight_dtype} "
                f"weights meet fp32 trainable ones and activations only under autocast), or weight_dtype=fp32"
            )
        return self

    # Keys that only extend or observe a run: a rerun that changes them resumes the same run.
    _OBSERVING = ("out", "tracking", "eval", "sample", "train.max_steps", "train.eval_every", "train.eval_batches",
                  "train.checkpoint_every", "train.checkpoints_to_keep", "train.sample_every", "train.log_every",
                  "scaling.address", "scaling.max_failures", "scaling.storage_path", "scaling.cpus_per_worker",
                  "scaling.gpu_memory_gb")

    def fingerprint(self) -> str:
        """8 hex digits over every key that changes what is trained (model, data, strategy and
        its learning rates, seed, schedule, workers, ...), none of `_OBSERVING`: two trials with
        the same fingerprint train the same thing, so one may resume from the other's checkpoint."""
        import hashlib
        import json

        flat = flatten(self)
        kept = {k: v for k, v in flat.items()
                if not any(k == o or k.startswith(o + ".") for o in self._OBSERVING)}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name / self.strategy.slug

    @property
    def sample_resolution(self) -> int:
        return self.sample.resolution or self.data.resolution


class ParamSpec(_Strict):
    """One axis of the search space; exactly one of the keys."""

    grid: list[Any] | None = Field(None, description="Every value (a grid axis; categorical for optuna/random).")
    choice: list[Any] | None = Field(None, description="Categorical choice.")
    loguniform: tuple[float, float] | None = Field(None, description="Log-uniform range [low, high].")
    uniform: tuple[float, float] | None = Field(None, description="Uniform range [low, high].")

    @model_validator(mode="after")
    def _exactly_one(self) -> ParamSpec:
        given = [k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform, uniform (got {given or 'none'})")
        rng = self.loguniform or self.uniform
        if rng is not None and not (rng[0] < rng[1] and (self.uniform is not None or rng[0] > 0)):
            raise ValueError(f"range must be low < high{' and low > 0' if self.loguniform else ''} (got {list(rng)})")
        if (self.grid is not None and not self.grid) or (self.choice is not None and not self.choice):
            raise ValueError("a grid or choice needs at least one value")
        return self

    @property
    def values(self) -> list[Any] | None:
        return self.grid if self.grid is not None else self.choice


#: What a finished trial reports besides its evaluation metrics, and which way is better.
TRIAL_METRICS = {"val_loss": "min", "loss": "min", "cost/wall_s": "min", "cost/gpu_hours": "min",
                 "cost/peak_memory_mb": "min", "cost/trainable_params": "min"}


def _direction(metric: str) -> str | None:
    """"min" or "max" for a metric a finished trial reports, None for any other name."""
    from .metrics.families import metric_direction

    if metric in TRIAL_METRICS:
        return TRIAL_METRICS[metric]
    try:
        return metric_direction(metric)
    except KeyError:
        return None


def objective_direction(metric: str) -> str:
    """"min" or "max": which way `metric` is better ("min" for a name no trial reports, which
    ObjectiveConfig then refuses by name)."""
    return _direction(metric) or "min"


class ObjectiveConfig(_Strict):
    metric: str = Field("val_loss", description="A metric the trial reports: val_loss, or an evaluation "
                        "metric such as stats/js, glcm/frechet, clip/score.")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise it.")

    @model_validator(mode="after")
    def _a_final_metric_the_right_way(self) -> ObjectiveConfig:
        """A typo (stats/wasserstien) used to validate and leave every trial without an objective
        value; `mode: max` on a distance crowned the least realistic trial."""
        from .metrics.families import FAMILIES
        from .metrics.quick import is_quick

        m = self.metric
        if is_quick(m):
            raise ValueError(f"metric {m!r} is a rung signal for search.scheduler.metric (validation samples taken "
                             f"during training), not a final objective: use {m[len('quick/'):]!r}, the full "
                             f"evaluation of a finished trial")
        direction = _direction(m)
        if direction is None:
            known = list(TRIAL_METRICS) + [k for f in FAMILIES.values() for k in f.directions]
            close = difflib.get_close_matches(m, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"metric {m!r} is not reported by a trial{hint}; valid: val_loss, loss, cost/*, or an "
                             f"evaluation metric such as {', '.join(k for f in FAMILIES.values() for k in list(f.directions)[:2])}")
        if direction != self.mode and not m.startswith("cost/"):
            better = "lower" if direction == "min" else "higher"
            raise ValueError(f"metric {m!r} is better {better}: set mode: {direction} (mode {self.mode} would rank the "
                             f"worst trial best)")
        return self


def asha_max_t(max_steps: int) -> int:
    """ASHA's max_t for trials of `max_steps` steps: one step short of the end. ASHA puts a
    rung at max_t, and a trial judged there would be stopped on its very last report (before
    saving, sampling and scoring)."""
    return max(max_steps - 1, 1)


def asha_rungs(grace_period: int, reduction_factor: float, max_steps: int) -> list[float]:
    """The steps at which sar-ray's ASHA judges trials: grace * factor**k up to max_t (as Ray's
    ASHA places them)."""
    max_t = asha_max_t(max_steps)
    rung, rungs = float(min(grace_period, max_t)), []
    while rung <= max_t:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


class SchedulerConfig(_Strict):
    type: Literal["asha", "none"] = Field("asha", description="ASHA early stopping on the validation loss, or none.")
    metric: str = Field("val_loss", description="Intermediate metric ASHA compares: val_loss (reported every "
                        "train.eval_every), or a quick realism metric quick/stats/js | quick/stats/kl | "
                        "quick/stats/wasserstein | quick/stats/ks: amplitude distance of the validation samples "
                        "taken every train.sample_every steps to the validation images (every rung step must be "
                        "a multiple of train.sample_every). A rung signal only: the final objective is always "
                        "the full evaluation of a finished trial.")
    mode: Literal["min", "max"] = Field("min")
    grace_period: int = Field(20, gt=0, description="Training steps before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep the best 1/reduction_factor at each rung.")

    @field_validator("metric")
    @classmethod
    def _reported_while_training(cls, v: str) -> str:
        """ASHA compares what a trial reports while it trains; a metric reported only at the
        end (stats/js, ...) would be missing at every rung, and ASHA would never stop a trial."""
        from .metrics.quick import QUICK, check_quick, is_quick

        if is_quick(v):
            check_quick(v)
        elif v not in ("val_loss", "loss"):
            raise ValueError(f"{v!r} is not reported while a trial trains (only at its end), so ASHA would never "
                             f"stop a trial; use val_loss, loss or a quick metric ({', '.join('quick/' + q for q in QUICK)})")
        return v


class SearchConfig(_Strict):
    algorithm: Literal["optuna", "grid", "random"] = Field(
        "optuna", description="optuna (TPE, seeded), grid (every combination), random."
    )
    seed: int = Field(0, description="Seed of the search algorithm.")
    num_samples: int = Field(1, gt=0, description="Points the search draws: optuna/random: points suggested "
                             "by the sampler; grid: passes over the whole grid. Trials = points x repeats.")
    repeats: int = Field(
        1, ge=1, description="Seed replicas of every search point: each point runs as `repeats` separate trials "
        "with train.seed + k (k = 0 .. repeats-1), and the report shows each point's mean and spread (std, "
        "min-max) over them. Unlike num_samples (more points), repeats measure how much one point's result "
        "moves with the seed alone. Not with train.seed in search.space.",
    )
    space: dict[str, ParamSpec] = Field(
        default_factory=dict,
        description="Dotted config keys -> axis. strategy.<component>.rank|alpha|dropout are sampled only "
        "where that component is LoRA.",
    )
    points: list[dict[str, Any]] | None = Field(
        None,
        description="Fixed search points (dotted space keys -> values; a conditional key only where it is "
        "active). grid: the grid is exactly these points (each must be a grid point); optuna/random: "
        "these are evaluated first, then the sampler goes on until num_samples.",
    )
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [ObjectiveConfig()], min_length=1,
        description="The objective; several make a multi-objective Optuna study (Pareto front in the report).",
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_trials: int | None = Field(None, gt=0, description="Default: what the cluster's resources fit.")
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial (resumes from its last checkpoint).")
    evaluate: bool = Field(True, description="Score each trial's final samples with the `eval` metrics.")
    reference: str | None = Field(
        None, description="Real SAR images the samples are scored against (default: the training split of "
        "data.path, i.e. neither its validation nor its held-out images)."
    )
    holdout: str | None = Field(
        None, description="Real SAR images for the `real (held out)` anchor row (default: the "
        "data.holdout_fraction split of data.path). Must share no image with the training data or the "
        "reference (compared by content): an overlap is refused.",
    )
    anchors: bool = Field(
        True, description="Score two anchor rows once per sweep, beside the trials: `base (untuned)` (the "
        "model before fine-tuning, sampled with the same prompts and seeds) and `real (held out)`; the "
        "report's realism column places each trial between them (0: untuned, 1: real). Needs evaluate.",
    )

    @model_validator(mode="after")
    def _coherent(self) -> SearchConfig:
        if self.algorithm == "grid":
            ranged = [k for k, v in self.space.items() if v.values is None]
            if ranged:
                raise ValueError(f"algorithm grid needs grid/choice axes; use optuna or random for {ranged}")
        if len(self.objectives) > 1 and self.algorithm != "optuna":
            raise ValueError("several objectives need algorithm optuna (multi-objective TPE)")
        if len(self.objectives) > 1 and self.scheduler.type == "asha":
            raise ValueError("ASHA stops trials on one metric: set search.scheduler.type=none for a multi-objective study")
        for i, point in enumerate(self.points or []):
            self._check_point(i, point)
        if self.repeats > 1 and "train.seed" in self.space:
            raise ValueError("repeats > 1 runs each point with train.seed + k: remove train.seed from search.space "
                             "(or set repeats: 1)")
        if self.repeats > 1 and len(self.objectives) > 1:
            raise ValueError("repeats > 1 averages one objective over a point's seeds: use one objective "
                             "(or set repeats: 1)")
        if self.points and self.algorithm != "grid" and self.num_samples < len(self.points):
            raise ValueError(f"num_samples ({self.num_samples}) is below the number of points ({len(self.points)}): "
                             f"the points past it would never run")
        return self

    def _check_point(self, i: int, point: dict[str, Any]) -> None:
        for key, value in point.items():
            spec = self.space.get(key)
            if spec is None:
                raise ValueError(f"points[{i}]: {key!r} is not a search.space key (valid: {', '.join(self.space)})")
            rng = spec.loguniform or spec.uniform
            if spec.values is not None and value not in spec.values:
                raise ValueError(f"points[{i}]: {key} = {value!r} is not one of {spec.values}")
            if rng is not None and not (isinstance(value, (int, float)) and rng[0] <= value <= rng[1]):
                raise ValueError(f"points[{i}]: {key} = {value!r} is outside [{rng[0]:g}, {rng[1]:g}]")


# Trial settings that are one for the whole sweep: the sweep's real sets (reference, held-out
# anchor) are split from data.path once, by name hash, with the base trial's fractions; a trial
# that split differently would train on the anchor's or the reference's images.
SWEEP_WIDE_KEYS = {
    "data.path": "every trial is scored against one reference made of its images",
    "data.val_fraction": "the held-out anchor is the hash slice after the validation one, so another "
                         "fraction would train on held-out images",
    "data.holdout_fraction": "the held-out anchor is split once per sweep, so another fraction would train "
                             "on held-out images or leave training images out",
}


def _sets(value: Any, dotted: str) -> bool:
    """Whether a section-valued search value (a dict) sets the setting at `dotted` inside it."""
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _varies(key: str, spec: ParamSpec, setting: str) -> bool:
    """Whether the search axis `key` varies the setting at dotted `setting`: the key itself, or a
    whole-section axis (`train: {grid: [{max_steps: ...}]}`) one of whose values sets it."""
    return key == setting or (setting.startswith(key + ".") and
                              any(_sets(v, setting[len(key) + 1:]) for v in spec.values or []))


class StudyConfig(TrialConfig):
    """A study file: the base trial plus (for sweeps) a `search` section."""

    search: SearchConfig | None = Field(
        None, description="Sweep search space and scheduler (used by `sar-ray sweep`)."
    )

    @model_validator(mode="after")
    def _space_keys_exist(self) -> StudyConfig:
        if self.search is None:
            return self
        for key in self.search.space:
            parts = key.split(".")
            valid = _model_fields(TrialConfig, tuple(parts))
            if parts[-1] not in valid:
                close = difflib.get_close_matches(parts[-1], valid, n=1)
                hint = f" (did you mean {'.'.join(parts[:-1] + [close[0]])!r}?)" if close else ""
                raise ValueError(f"search.space: {key!r} is not a trial setting{hint}")
            # The key itself first, then a whole-section axis (`data: {grid: [{path: ...}]}`).
            wide = [key] if key in SWEEP_WIDE_KEYS else [
                w for w in SWEEP_WIDE_KEYS if _varies(key, self.search.space[key], w)]
            if wide:
                what = "" if wide[0] == key else f" {wide[0]}"
                raise ValueError(f"search.space: {key!r} cannot vary{what} between trials: {SWEEP_WIDE_KEYS[wide[0]]}; "
                                 f"set it once, outside search.space")
        return self

    @model_validator(mode="after")
    def _objectives_are_computed(self) -> StudyConfig:
        """An evaluation objective exists only where the sweep evaluates that family."""
        if self.search is None:
            return self
        for i, o in enumerate(self.search.objectives):
            if o.metric in TRIAL_METRICS:
                continue
            where = f"search.objectives[{i}].metric={o.metric}"
            if not self.search.evaluate:
                raise ValueError(f"{where}: search.evaluate is false, so no trial is scored; set search.evaluate: "
                                 f"true, or use val_loss")
            family = o.metric.split("/")[0]
            if family not in self.eval.metrics:
                raise ValueError(f"{where}: the {family!r} family is not in eval.metrics {self.eval.metrics}; add it")
        return self

    @model_validator(mode="after")
    def _asha_trials_share_their_rungs(self) -> StudyConfig:
        """ASHA's rungs (and max_t) come from the base trial's train.max_steps, and a quick
        metric's alignment from its train.sample_every: a point with fewer steps was judged at its
        own last step (and stopped there, unsaved and unscored), one with another sample cadence
        at a stale quick value."""
        sc = self.search.scheduler if self.search is not None else None
        if sc is None or sc.type != "asha":
            return self
        from .metrics.quick import is_quick

        fixed = ["train.max_steps"] + (["train.sample_every"] if is_quick(sc.metric) else [])
        for key, spec in self.search.space.items():
            for setting in fixed:
                if _varies(key, spec, setting):
                    raise ValueError(f"search.space: {key!r} varies {setting} under ASHA, whose rungs "
                                     f"({sc.metric}) are set once from the base trial's; set it outside "
                                     f"search.space, or use search.scheduler.type=none")
        return self

    @model_validator(mode="after")
    def _quick_metric_has_samples_at_every_rung(self) -> StudyConfig:
        sc = self.search.scheduler if self.search is not None else None
        from .metrics.quick import check_quick, is_quick

        if sc is None or sc.type != "asha" or not is_quick(sc.metric):
            return self

        check_quick(sc.metric)
        every = self.train.sample_every
        if not every:
            raise ValueError(f"search.scheduler.metric={sc.metric}: set train.sample_every (the quick metric is "
                             f"computed on the samples taken then), e.g. train.sample_every={sc.grace_period}")
        if self.data.val_fraction <= 0:
            raise ValueError(f"search.scheduler.metric={sc.metric}: needs validation images (data.val_fraction > 0)")
        rungs = asha_rungs(sc.grace_period, sc.reduction_factor, self.train.max_steps)
        off = [r for r in rungs if r != int(r) or int(r) % every]
        if off:
            raise ValueError(f"search.scheduler.metric={sc.metric}: ASHA rungs at steps {[round(r, 1) for r in rungs]} "
                             f"are not all multiples of train.sample_every={every} (first: {off[0]:g}); make "
                             f"grace_period a multiple of it and reduction_factor an integer")
        return self

    def trial(self, **updates: Any) -> TrialConfig:
        """The base trial of this study, with dotted-path updates applied and re-validated."""
        raw = self.model_dump(exclude={"search"})
        for key, value in updates.items():
            _set_path(raw, key.split("."), value)
        return TrialConfig.model_validate(raw)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _set_path(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts)}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def _model_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at `loc` (for 'did you mean' hints)."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None) or (ann,)
        cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        path = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _model_fields(model, loc)
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown key{hint}; valid keys: {', '.join(valid)}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {path}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key like strategy.unet.rank")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    # yaml reads `1e-4` as a string (YAML 1.1 needs a dot); users mean the number.
    parsed = _fix_floats(parsed)
    return key, parsed


def _fix_floats(node: Any) -> Any:
    # PyYAML (YAML 1.1) reads `1e-4` as a string; every user means a float.
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node):
        return float(node)
    return node


def load_raw(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; pass a YAML file such as sweeps/quickstart.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model, data, ...)")
    return _fix_floats(raw)


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Load a study file, apply `--set` overrides and validate everything at once."""
    raw = load_raw(path)
    source = str(path) if path is not None else "<defaults>"
    for item in overrides:
        key, value = parse_override(item)
        try:
            _set_path(raw, key.split("."), value)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
    if overrides:
        source += " (with --set " + " ".join(overrides) + ")"
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, StudyConfig)) from None
    if study.search is not None:
        from sar_ray.sweep import check_search  # imports ray.tune: only for studies with a search

        # Every point the search can produce must be a valid trial (a typo inside a grid value
        # would otherwise drop its points silently at sweep time).
        check_search(study, f"{source}: search.space")
    return study


def validate_trial(raw: dict, source: str = "<trial>") -> TrialConfig:
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, TrialConfig)) from None


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of every resolved parameter (what MLflow logs as params)."""
    d = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
