"""Memory plan of a study (`sar-ray validate FILE --plan`): for each distinct strategy, the
trainable parameters and the GPU memory one worker needs, from the real architecture built on
the meta device (exact shapes, no memory: SDXL's 3.5 B parameters would take 14 GB in fp32).

    memory = plan_study(study)     # one row per strategy slug of the base trial + search space
    check_memory(study)            # ConfigError where the lower bound exceeds scaling.gpu_memory_gb

Per worker (GB here = 2**30 bytes: an "80 GB" A100/H100 holds 80 GiB):
- weights: frozen ones in `model.weight_dtype` (the VAE in fp32 under `model.vae_force_upcast`),
  trainable ones in fp32 (master weights, as `strategies.place` puts them);
- gradients: fp32, one per trainable parameter;
- optimizer: AdamW's two fp32 moments (`adamw8bit`: two 1-byte moments);
- sync buffer: with several workers `train._allreduce_grads` flattens every gradient into one
  extra fp32 buffer;
- EMA: one fp32 copy of the UNet (`train.ema` with a fully tuned UNet).
Their sum is the lower bound: no step runs in less, so only it justifies refusing a study.
Activations are an estimate (`_SavedTensors`) and only ever warn.

Which architecture: a local folder's own `<component>/config.json`; a hub id's configs from the
local Hugging Face cache (never downloaded); else the public configs of its family shipped in
`sar_ray/model_configs/`. `tiny-*` models are planned at the size of the real model of their
family: the plan of a smoke twin is the plan of the run it stands for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import natural
from .config import ComponentStrategy, ConfigError, ModelConfig, StudyConfig, TrialConfig
from .models import detect_kind
from .strategies import TRAINABLE_PREFIXES, _sdxl_unused_parameters, lora_config

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trainable parameter: two moments
TINY_FAMILIES = {"tiny-sd": "sd15", "tiny-sd15": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json"}
MAX_TOKENS = 77


# --------------------------------------------------------------------------------------------
# the architecture: configs, built on the meta device
# --------------------------------------------------------------------------------------------


@dataclass
class Architecture:
    """The components of one model on the meta device, and where their configs came from."""

    kind: str  # sd | sdxl
    modules: dict[str, nn.Module]  # unet, vae, text_encoder[, text_encoder_2]
    note: str
    _cache: dict = field(default_factory=dict, repr=False)  # activation estimates by setting

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def family_of(name: str) -> str:
    """The shipped family a hub id stands for when its configs are not cached."""
    lowered = name.lower()
    return "sdxl" if "xl" in lowered else "sd2" if "stable-diffusion-2" in lowered else "sd15"


def shipped_configs(family: str) -> dict[str, dict]:
    raw = json.loads(resources.files("sar_ray.model_configs").joinpath(f"{family}.json").read_text())
    return {k: _strip(v) for k, v in raw.items() if not k.startswith("_")}


def _collect(read: Callable[[str], dict | None]) -> dict[str, dict] | None:
    """model_index + each component's config through `read(filename)`; None if one is missing."""
    index = read("model_index.json")
    if index is None:
        return None
    names = list(CONFIG_FILES)[: 4 if detect_kind(index) == "sdxl" else 3]
    configs = {n: read(CONFIG_FILES[n]) for n in names}
    if any(c is None for c in configs.values()):
        return None
    return {"model_index": index, **{n: _strip(c) for n, c in configs.items()}}


def _read_folder(root: Path) -> Callable[[str], dict | None]:
    return lambda f: json.loads((root / f).read_text()) if (root / f).is_file() else None


def _read_cache(repo_id: str, revision: str | None) -> Callable[[str], dict | None]:
    from huggingface_hub import try_to_load_from_cache

    def read(filename: str) -> dict | None:
        try:
            path = try_to_load_from_cache(repo_id, filename, revision=revision)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under it
            return None
        return json.loads(Path(path).read_text()) if isinstance(path, str) else None

    return read


def resolve_configs(model: ModelConfig) -> tuple[dict[str, dict], str]:
    """(configs by component, where they came from) for `model.pretrained`, without a download."""
    src = natural.base_of(model.pretrained) if natural.is_natural(model.pretrained) else model.pretrained
    if src in TINY_FAMILIES:
        family = TINY_FAMILIES[src]
        return shipped_configs(family), f"{src}: planned at the size of the real {family} model"
    try:
        if Path(src).is_dir():
            found = _collect(_read_folder(Path(src)))
            if found is None:
                raise ConfigError(f"model.pretrained={src!r}: no model_index.json and component "
                                  "config.json files in that folder")
            return found, f"{src}: its own configs"
        found = _collect(_read_cache(src, model.revision))
    except ValueError as e:  # detect_kind: an SDXL refiner has no first text encoder
        raise ConfigError(f"model.pretrained={src!r}: {e}") from None
    if found is not None:
        return found, f"{src}: configs from the local Hugging Face cache"
    family = family_of(src)
    return shipped_configs(family), f"{src}: not in the local cache, planned from the public {family} configs"


@lru_cache(maxsize=4)
def _build(configs_json: str) -> dict[str, nn.Module]:
    configs = json.loads(configs_json)
    with torch.device("meta"):
        modules: dict[str, nn.Module] = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
        }
        if "text_encoder_2" in configs:
            config = CLIPTextConfig.from_dict(configs["text_encoder_2"])
            modules["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return modules


@lru_cache(maxsize=4)
def architecture(pretrained: str, revision: str | None = None) -> Architecture:
    """The model of `pretrained` on the meta device (cached: a study's points share it)."""
    configs, note = resolve_configs(ModelConfig(pretrained=pretrained, revision=revision))
    kind = "sdxl" if "text_encoder_2" in configs else "sd"
    modules = _build(json.dumps({k: v for k, v in configs.items() if k in CONFIG_FILES}, sort_keys=True))
    return Architecture(kind=kind, modules=modules, note=note)


# --------------------------------------------------------------------------------------------
# what trains: the rules of strategies.apply, counted on the meta modules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentPlan:
    """One component under its strategy: how many parameters train, how many stay frozen."""

    name: str
    mode: str
    trainable: int
    frozen: int
    frozen_bytes: int  # per frozen parameter


def may_train(arch: Architecture, name: str) -> set[int]:
    """Ids of the parameters a strategy can train: the VAE's decoder side only, and for SDXL's
    first text encoder all but its last layer and final norm (they never get a gradient)."""
    module = arch.modules[name]
    prefixes = TRAINABLE_PREFIXES.get(name)
    ids = {id(p) for n, p in module.named_parameters() if prefixes is None or n.startswith(prefixes)}
    if arch.kind == "sdxl" and name == "text_encoder":
        ids -= {id(p) for p in _sdxl_unused_parameters(module)}
    return ids


def lora_layers(arch: Architecture, name: str, comp: ComponentStrategy) -> list[nn.Module]:
    """The layers peft adapts: matched by peft's own rule on `strategies.lora_config`'s targets."""
    config = lora_config(comp, name)
    return [m for n, m in arch.modules[name].named_modules() if n and check_target_module_exists(config, n)]


def lora_size(layer: nn.Module, rank: int) -> int:
    """Parameters LoRA adds to one layer: A (r x in) and B (out x r); a conv's A keeps its kernel."""
    if isinstance(layer, nn.Linear):
        return rank * (layer.in_features + layer.out_features)
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return rank * layer.in_channels * kh * kw + rank * layer.out_channels // layer.groups
    if isinstance(layer, nn.Embedding):
        return rank * (layer.num_embeddings + layer.embedding_dim)
    return 0


def _count(arch: Architecture, name: str, comp: ComponentStrategy) -> tuple[int, int]:
    """(trainable, frozen) parameters of one component, before any learned token."""
    module = arch.modules[name]
    total = sum(p.numel() for p in module.parameters())
    if comp.mode == "full":
        scope = may_train(arch, name)
        trainable = sum(p.numel() for p in module.parameters() if id(p) in scope)
        return trainable, total - trainable
    if comp.mode == "lora":
        # Adapters outside what may train (SDXL's unused last layer) exist but stay frozen.
        scope, layers = may_train(arch, name), lora_layers(arch, name, comp)
        trainable = sum(lora_size(m, comp.rank) for m in layers if id(m.weight) in scope)
        return trainable, total + sum(lora_size(m, comp.rank) for m in layers) - trainable
    return 0, total


def component_plans(arch: Architecture, cfg: TrialConfig) -> list[ComponentPlan]:
    """Every component of `cfg.strategy` on `arch`: counts, and the bytes of a frozen parameter.

    A learned token grows each encoder's embedding by one row (trainable with a `full`
    encoder, frozen otherwise) and adds the trainable fp32 row the optimizer sees.
    """
    s, m = cfg.strategy, cfg.model
    te_names = [n for n in arch.modules if n.startswith("text_encoder")]
    strategies = {"unet": s.unet, **dict(zip(te_names, s.text_encoder_strategies(len(te_names)))), "vae": s.vae}
    out = []
    for name, comp in strategies.items():
        key = ("count", name, comp.mode, comp.rank if comp.mode == "lora" else None,
               tuple(comp.target_modules or ()))
        trainable, frozen = arch.cached(key, lambda: _count(arch, name, comp))
        if s.token == "learn" and name in te_names:
            row = arch.modules[name].config.hidden_size
            trainable += row  # the new row the optimizer sees (LearnedTokenEmbedding.new_rows)
            if comp.mode == "full":
                trainable += row  # the grown base matrix trains with the encoder
            else:
                frozen += row
        # strategies.place: a fully tuned component stays fp32 whole (its frozen bits too)
        upcast = (name == "vae" and m.vae_force_upcast) or comp.mode == "full"
        out.append(ComponentPlan(name, comp.mode, trainable, frozen, 4 if upcast else DTYPE_BYTES[m.weight_dtype]))
    return out


# --------------------------------------------------------------------------------------------
# bytes per worker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyPlan:
    """The memory of one trial per worker, in bytes; `points` name the search points it covers."""

    slug: str
    points: tuple[str, ...]
    components: tuple[ComponentPlan, ...]
    weights: int
    grads: int
    optimizer: int
    sync: int
    ema: int
    activations: int | None  # None: not estimated (check_memory needs only the lower bound)
    budget_gb: float | None

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.components)

    @property
    def lower_bound(self) -> int:
        return self.weights + self.grads + self.optimizer + self.sync + self.ema

    @property
    def total(self) -> int:
        """Conservative: the sync buffer (optimizer step) and activations (backward) are
        summed although they are never alive at once."""
        return self.lower_bound + (self.activations or 0)


def memory_bytes(components: list[ComponentPlan], cfg: TrialConfig) -> dict[str, int]:
    """weights, grads, optimizer, sync, ema in bytes per worker (see the module docstring)."""
    trainable = sum(c.trainable for c in components)
    unet = next(c for c in components if c.name == "unet")
    ema = cfg.train.ema.enabled and unet.mode == "full"
    return {
        "weights": sum(4 * c.trainable + c.frozen_bytes * c.frozen for c in components),
        "grads": 4 * trainable,
        "optimizer": OPTIMIZER_BYTES[cfg.train.optimizer] * trainable,
        "sync": 4 * trainable if cfg.scaling.num_workers > 1 else 0,
        "ema": 4 * (unet.trainable + unet.frozen) if ema else 0,
    }


def plan_trial(cfg: TrialConfig, points: tuple[str, ...] = ("base trial",), activations: bool = True) -> StrategyPlan:
    """The memory of one trial per worker; `activations=False` skips the (slower) estimate."""
    arch = architecture(cfg.model.pretrained, cfg.model.revision)
    components = component_plans(arch, cfg)
    return StrategyPlan(
        slug=cfg.strategy.slug, points=points, components=tuple(components),
        **memory_bytes(components, cfg),
        activations=activation_bytes(arch, cfg) if activations else None,
        budget_gb=cfg.scaling.gpu_memory_gb,
    )


# --------------------------------------------------------------------------------------------
# activations: an estimate from a forward pass on the meta device
# --------------------------------------------------------------------------------------------

# What torch.autocast runs in half precision and in fp32 (its CUDA op lists, abridged).
HALF_OPS = {"linear", "conv1d", "conv2d", "matmul", "__matmul__", "bmm", "baddbmm", "mm", "addmm", "einsum"}
FP32_OPS = {"group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "l1_loss"}
COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _FusedAttention(torch.autograd.Function):
    """What the fused CUDA attention kernels keep for backward: q, k, v, the output and the
    log-sum-exp, never the (L, L) score matrix the meta fallback would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, Lq, Dv)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the plan never runs backward
        raise NotImplementedError


class _Norm(torch.autograd.Function):
    """What a fused layer / group norm keeps for backward: its input (and tiny statistics).
    Also spares the meta device its slow Python decomposition of the norms."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the plan never runs backward
        raise NotImplementedError


class _SavedTensors(TorchFunctionMode):
    """Bytes autograd keeps for backward during a meta forward, under emulated autocast.

    Meta tensors have no autocast, so this mode casts as torch.autocast would (matmuls and
    convs to `dtype`, norms and softmax to fp32; `dtype=None`: no autocast) and caches the cast
    of each fp32 trainable weight (`cached`) as autocast does: those copies live for the whole
    forward. A saved-tensors hook counts what backward keeps, parameters excluded.

    Gradient checkpointing is modelled by handing `region` to diffusers as the checkpointing
    function: a checkpointed block keeps only its inputs until backward, which recomputes one
    block at a time, so the peak holds what is saved outside blocks, every block's inputs, and
    the largest block's own saved tensors.
    """

    def __init__(self, dtype: torch.dtype | None, cached: set[int]):
        super().__init__()
        self.dtype, self.cached = dtype, cached
        self.casts: dict[int, torch.Tensor] = {}  # trainable weight id -> its cached cast
        self._cast_ids: set[int] = set()
        self.nbytes: dict[int, int] = {}
        self.outside: set[int] = set()
        self.inputs: set[int] = set()
        self.regions: list[set[int]] = []
        self._region: set[int] | None = None
        self._alive: list[torch.Tensor] = []  # keeps ids unique while counting

    def _key(self, t: torch.Tensor) -> int | None:
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or id(base) in self._cast_ids:
            return None
        self._alive.append(base)
        self.nbytes[id(base)] = base.numel() * base.element_size()
        return id(base)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key is not None:
            (self._region if self._region is not None else self.outside).add(key)
        return t

    def region(self, module: Callable, *args: Any) -> Any:
        self.inputs.update(k for a in args if isinstance(a, torch.Tensor) and (k := self._key(a)) is not None)
        outer, self._region = self._region, set()
        try:
            return module(*args)
        finally:
            self.regions.append(self._region)
            self._region = outer

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        if id(x) not in self.cached:
            return x.to(dtype)
        if id(x) not in self.casts:
            self.casts[id(x)] = x.to(dtype)
            self._cast_ids.add(id(self.casts[id(x)]))
        return self.casts[id(x)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            q, k, v = (self._cast(t, self.dtype) if self.dtype else t for t in args[:3])
            return _FusedAttention.apply(q, k, v)
        if name in ("layer_norm", "group_norm"):
            x, weight, bias = _norm_args(args, kwargs)
            return _Norm.apply(self._cast(x, torch.float32) if self.dtype else x, weight, bias)
        target = None if self.dtype is None else self.dtype if name in HALF_OPS else (
            torch.float32 if name in FP32_OPS else None)
        if target is not None:
            args = tuple(self._cast(a, target) for a in args)
            kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    @contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t), self:
            yield

    def total(self, checkpointing: bool) -> int:
        cast_bytes = sum(c.numel() * c.element_size() for c in self.casts.values())
        if not checkpointing:
            return sum(self.nbytes.values()) + cast_bytes
        kept = self.outside | self.inputs
        worst = max((sum(self.nbytes[k] for k in r - kept) for r in self.regions), default=0)
        return sum(self.nbytes[k] for k in kept) + worst + cast_bytes


def _norm_args(args: tuple, kwargs: dict) -> tuple:
    """(input, weight, bias) of F.layer_norm(x, shape, w, b, eps) / F.group_norm(x, groups, w, b, eps)."""
    rest = list(args[2:4]) + [None] * (2 - len(args[2:4]))
    return args[0], kwargs.get("weight", rest[0]), kwargs.get("bias", rest[1])


def _place(module: nn.Module, grads: set[int], trainable: set[int], frozen: torch.dtype) -> None:
    """Meta weights as `strategies.place` puts real ones: trainable fp32, the rest `frozen`;
    `grads` (trainable, plus the layers LoRA adapts) require a gradient."""
    for p in module.parameters():
        p.data = p.data.to(torch.float32 if id(p) in trainable else frozen)
        p.requires_grad_(id(p) in grads)


def _grad_sets(arch: Architecture, name: str, comp: ComponentStrategy, token: bool) -> tuple[set[int], set[int]]:
    """(parameters needing a gradient, fp32 trainable ones) for the activation estimate.

    A LoRA layer saves its input for the adapter's gradient, as training the layer's own weight
    would: marking the adapted weights trainable gives the same saved tensors without peft.
    """
    trainable = may_train(arch, name) if comp.mode == "full" else set()
    grads = set(trainable)
    if comp.mode == "lora":
        grads |= {id(m.weight) for m in lora_layers(arch, name, comp)} & may_train(arch, name)
    if token and name.startswith("text_encoder"):
        grads.add(id(arch.modules[name].get_input_embeddings().weight))
    return grads, trainable


def _estimate(module: nn.Module, dtype: torch.dtype | None, trainable: set[int],
              forward: Callable[[], Any], checkpoint: Callable[[Callable], None] | None = None) -> int:
    saved = _SavedTensors(dtype, trainable)
    if checkpoint is not None:
        checkpoint(saved.region)
    try:
        with saved.counting():
            forward()
    finally:
        if checkpoint is not None and hasattr(module, "disable_gradient_checkpointing"):
            module.disable_gradient_checkpointing()
    return saved.total(checkpointing=checkpoint is not None)


def _unet_activations(arch: Architecture, cfg: TrialConfig, text_grad: bool) -> int:
    unet, s, t = arch.modules["unet"], cfg.strategy, cfg.train
    grads, trainable = _grad_sets(arch, "unet", s.unet, token=False)
    if not grads and not text_grad:
        return 0  # nothing before or in the UNet needs a gradient: it keeps nothing
    _place(unet, grads, trainable, WEIGHT_DTYPES[cfg.model.weight_dtype])
    b, latent = t.batch_size, cfg.data.resolution // _vae_factor(arch)
    sample = torch.empty(b, unet.config.in_channels, latent, latent, device="meta")  # (B, 4, R/8, R/8)
    context = torch.empty(b, MAX_TOKENS, unet.config.cross_attention_dim, device="meta", requires_grad=text_grad)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.empty(b, pooled, device="meta", requires_grad=text_grad),
                 "time_ids": torch.empty(b, 6, device="meta")}
    timesteps = torch.zeros(b, dtype=torch.long, device="meta")

    def forward():
        unet(sample, timesteps, context, added_cond_kwargs=added, return_dict=False)

    def checkpoint(fn):
        unet.enable_gradient_checkpointing(fn)

    return _estimate(unet, COMPUTE_DTYPES[t.mixed_precision], trainable, forward,
                     checkpoint if t.gradient_checkpointing else None)


def _text_activations(arch: Architecture, cfg: TrialConfig, name: str, comp: ComponentStrategy) -> int:
    """Counted without checkpointing: 77 tokens keep a few hundred MB at most."""
    te, token = arch.modules[name], cfg.strategy.token == "learn"
    grads, trainable = _grad_sets(arch, name, comp, token)
    if not grads:
        return 0
    _place(te, grads, trainable, WEIGHT_DTYPES[cfg.model.weight_dtype])
    ids = torch.zeros(cfg.train.batch_size, MAX_TOKENS, dtype=torch.long, device="meta")
    return _estimate(te, COMPUTE_DTYPES[cfg.train.mixed_precision], trainable,
                     lambda: te(ids, output_hidden_states=True))


def _vae_activations(arch: Architecture, cfg: TrialConfig) -> int:
    """The decoder reconstructing the batch at full resolution, in the VAE's own dtype (outside
    autocast, as `diffusion.decode_latents`); the frozen encoder keeps nothing."""
    vae, comp = arch.modules["vae"], cfg.strategy.vae
    grads, trainable = _grad_sets(arch, "vae", comp, token=False)
    if not grads:
        return 0
    dtype = torch.float32 if cfg.model.vae_force_upcast else WEIGHT_DTYPES[cfg.model.weight_dtype]
    _place(vae, grads, trainable, dtype)
    side = cfg.data.resolution // _vae_factor(arch)
    z = torch.empty(cfg.train.batch_size, vae.config.latent_channels, side, side, device="meta", dtype=dtype)
    return _estimate(vae, None, trainable, lambda: vae.decode(z))


def _vae_factor(arch: Architecture) -> int:
    return 2 ** (len(arch.modules["vae"].config.block_out_channels) - 1)


def activation_bytes(arch: Architecture, cfg: TrialConfig) -> int:
    """Estimated activation memory of one micro-batch (`train.batch_size` at `data.resolution`).

    An estimate: tensors autograd saves and autocast's weight copies, counted on a meta
    forward; forward temporaries, backward's own buffers, the CUDA context and allocator
    fragmentation are not in it. The UNet keeps activations whenever it or anything before it
    trains; checkpointing follows `train.gradient_checkpointing` for the UNet.
    """
    s, t, m, d = cfg.strategy, cfg.train, cfg.model, cfg.data
    setting = (t.batch_size, d.resolution, t.mixed_precision, t.gradient_checkpointing, m.weight_dtype,
               m.vae_force_upcast)
    te_names = [n for n in arch.modules if n.startswith("text_encoder")]
    te_comps = dict(zip(te_names, s.text_encoder_strategies(len(te_names))))
    text_grad = s.token == "learn" or any(c.mode != "frozen" for c in te_comps.values())

    def key(name, comp, *extra):  # the LoRA rank changes no saved tensor (see _grad_sets)
        return ("act", name, comp.mode, tuple(comp.target_modules or ()), *setting, *extra)

    total = arch.cached(key("unet", s.unet, text_grad), lambda: _unet_activations(arch, cfg, text_grad))
    for name, comp in te_comps.items():
        total += arch.cached(key(name, comp, s.token), lambda: _text_activations(arch, cfg, name, comp))
    return total + arch.cached(key("vae", s.vae), lambda: _vae_activations(arch, cfg))


# --------------------------------------------------------------------------------------------
# the study: its distinct strategies
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return str(value)


def point_label(params: dict[str, Any]) -> str:
    """A search point as the keys it sets, e.g. `strategy.unet={mode: full, lr: 1.0e-05}`."""
    return " ".join(f"{k}={_show(v)}" for k, v in params.items()) or "base trial"


def study_points(study: StudyConfig) -> list[tuple[str, TrialConfig]]:
    """The base trial and every point of the search space that can change memory.

    Grid: every point. Optuna / random: the product of the grid/choice axes; continuous
    axes (learning rates, dropout) do not change memory and keep their base values.
    """
    base = study.trial()
    points = [("base trial", base)]
    if study.search is None or not study.search.space:
        return points
    from .sweep import grid_points  # imports ray.tune: only where a search space exists

    search = study.search
    if search.algorithm != "grid":
        categorical = {k: v for k, v in search.space.items() if v.values is not None}
        search = search.model_copy(update={"space": categorical})
    return points + [(point_label(p), study.trial(**p)) for p in grid_points(search, base)]


@dataclass(frozen=True)
class StudyPlan:
    note: str  # where the architecture came from
    points: tuple[StrategyPlan, ...]  # one per point: base trial first, then the search points

    def strategies(self) -> list[StrategyPlan]:
        """One per slug, the heaviest point of it, naming every point that has that strategy."""
        by_slug: dict[str, list[StrategyPlan]] = {}
        for p in self.points:
            by_slug.setdefault(p.slug, []).append(p)
        return [
            replace(max(group, key=lambda p: (p.lower_bound, p.total)),
                    points=tuple(label for p in group for label in p.points))
            for group in by_slug.values()
        ]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) for `sar-ray validate --plan`: counts, then GB per worker."""
        rows = self.strategies()
        with_ema = any(r.ema for r in rows)
        header = ["strategy", "trainable", "weights", "grads", "optimizer", "sync buffer",
                  *(["EMA"] if with_ema else []), "activations ~", "lower bound", "total ~"]
        out = []
        for r in rows:
            sizes = [r.weights, r.grads, r.optimizer, r.sync, *([r.ema] if with_ema else []),
                     r.activations or 0, r.lower_bound, r.total]
            out.append([r.slug, _params(r.trainable), *(f"{b / GiB:.1f}" for b in sizes)])
        return header, out

    def warnings(self) -> list[str]:
        """Strategies whose estimate with activations exceeds the budget (lower bound within it)."""
        return [
            f"{r.slug}: about {r.total / GiB:.1f} GB per worker with activations, over "
            f"scaling.gpu_memory_gb={r.budget_gb:g} (lower bound {r.lower_bound / GiB:.1f} GB)"
            for r in self.strategies()
            if r.budget_gb is not None and r.lower_bound <= r.budget_gb * GiB < r.total
        ]

    def refusal(self) -> str | None:
        """One line naming the points whose lower bound alone exceeds their budget, or None."""
        over = [p for p in self.points if p.budget_gb is not None and p.lower_bound > p.budget_gb * GiB]
        if not over:
            return None
        budget = max(p.budget_gb for p in over)
        named = "; ".join(f"{p.slug} needs {p.lower_bound / GiB:.1f} GB ({', '.join(p.points)})" for p in over)
        return (f"scaling.gpu_memory_gb={budget:g}: weights, gradients and optimizer state alone exceed it "
                f"for {len(over)} point(s): {named}; use LoRA, train.optimizer=adamw8bit, or larger GPUs")


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def plan_study(study: StudyConfig, activations: bool = True) -> StudyPlan:
    """The memory plan of every point of `study` (see the module docstring)."""
    points = tuple(plan_trial(cfg, (label,), activations) for label, cfg in study_points(study))
    arch = architecture(study.model.pretrained, study.model.revision)
    return StudyPlan(note=arch.note, points=points)


def check_memory(study: StudyConfig, source: str | None = None) -> None:
    """Refuse a study whose lower bound per worker exceeds `scaling.gpu_memory_gb` somewhere,
    before any compute starts; nothing to check (and nothing built) when it is not set."""
    if study.scaling.gpu_memory_gb is None:
        return
    message = plan_study(study, activations=False).refusal()
    if message is not None:
        raise ConfigError(f"{source}: {message}" if source else message)
