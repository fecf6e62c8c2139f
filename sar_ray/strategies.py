"""How each component trains: `frozen`, `full` or `lora`, plus the learned `<SAR>` token.

    applied = apply(components, cfg.strategy, default_lr=cfg.train.lr)
    opt = torch.optim.AdamW(applied.param_groups, weight_decay=...)

`apply` is the single place that decides `requires_grad`: after it returns, exactly the
parameters in `applied.param_groups` are trainable (fp32), everything else is frozen.

Each mode owns its whole path in one registry entry (`MODES`, and `TOKEN` for the learned
token): `apply` (what trains), `save` (what a trial writes, loadable by plain diffusers),
`load` (what sampling must load back into a base pipeline). `checkpoint.save_outputs` refuses
a trainable mode without a saver, so a new mode can never train and then be scored as the
base model.

The learned token. Textual inversion trains one row of the token embedding matrix. Putting
the whole matrix in the optimizer would move every other row too (AdamW weight decay shrinks
them, and a LoRA-tuned or frozen text encoder must keep them exact), so diffusers' script
restores the other rows after each step. Here the embedding is replaced by
:class:`LearnedTokenEmbedding`: the base matrix plus a small trainable `(n_new, dim)`
parameter substituted for the new ids, so the new row always trains at `strategy.token_lr`
in its own optimizer group. With a `full` text encoder the base matrix trains too (at the
encoder's rate); with `frozen` or `lora` it stays exact.

The VAE trains its decoder only (`full`: decoder and post_quant_conv; `lora`: adapters in the
decoder): the encoder stays the frozen base, so the UNet always learns on the base model's
latents (which a latent cache can share between trials) and the decoder learns to render SAR.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import Tensor, nn

from sar_ray.config import ComponentStrategy, StrategyConfig, TrialConfig
from sar_ray.models import Components, cast_module

# Default LoRA targets per component family: the attention projections (what diffusers'
# training scripts adapt). The VAE has attention only in its mid blocks, so its resnet convs
# are adapted too, or a VAE LoRA could barely change the decoder.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "unet": ["to_k", "to_q", "to_v", "to_out.0"],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "vae": ["to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2"],
}


def _family(component_name: str) -> str:
    return "text_encoder" if component_name.startswith("text_encoder") else component_name


# --------------------------------------------------------------------------------------------
# the learned token
# --------------------------------------------------------------------------------------------


class LearnedTokenEmbedding(nn.Module):
    """A token embedding whose rows >= `first_new_id` come from a trainable fp32 parameter.

    `base` is frozen (and may be fp16/bf16) unless its text encoder is fully tuned; `new_rows`
    is (n_new, dim) fp32. Forward equals `nn.Embedding` with the new rows written into the
    matrix. `apply` decides `requires_grad` of both.
    """

    def __init__(self, base: nn.Embedding, first_new_id: int):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new_rows = nn.Parameter(base.weight.detach()[first_new_id:].to(torch.float32).clone())

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> Tensor:
        """The effective (vocab, dim) matrix (what `materialize_token` writes back)."""
        w = self.base.weight
        return torch.cat([w[: self.first_new_id], self.new_rows.to(w.dtype)], dim=0)

    def forward(self, input_ids: Tensor) -> Tensor:
        out = F.embedding(input_ids, self.base.weight)  # (B, T, D)
        is_new = (input_ids >= self.first_new_id).unsqueeze(-1)  # (B, T, 1)
        # Always computed (no `if is_new.any()`): no host sync, and DDP sees the parameter used.
        new = self.new_rows.to(out.dtype)[(input_ids - self.first_new_id).clamp(min=0)]
        return torch.where(is_new, new, out)


def _add_token(c: Components, s: StrategyConfig) -> tuple[list[int], list[int]]:
    """Add `s.token_string` to every tokenizer, grow every encoder, init the row from `token_init`.

    Returns (new token id, init token id) per tokenizer.
    """
    new_ids, init_ids = [], []
    for tok, te, name in zip(c.tokenizers, c.text_encoders, c.tokenizer_names):
        init = tok.encode(s.token_init, add_special_tokens=False)
        if not init:
            raise ValueError(f"strategy.token_init {s.token_init!r} tokenises to nothing")
        # The check diffusers' load_textual_inversion makes: a known string cannot be loaded back.
        if s.token_string in tok.get_vocab() or tok.add_tokens(s.token_string) != 1:
            raise ValueError(
                f"strategy.token_string {s.token_string!r} is already in {name}'s vocabulary; "
                "pick a string the model does not know, such as <SAR>"
            )
        new_id = tok.convert_tokens_to_ids(s.token_string)
        # mean_resizing=False: the new row is overwritten just below.
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            emb = te.get_input_embeddings().weight
            emb[new_id] = emb[init[0]]
        new_ids.append(new_id)
        init_ids.append(init[0])
    return new_ids, init_ids


def token_modules(c: Components) -> dict[str, LearnedTokenEmbedding]:
    """Text encoder name -> its learned-token wrapper (encoders without one are left out)."""
    out = {}
    for name, te in zip(c.text_encoder_names, c.text_encoders):
        emb = te.get_input_embeddings()
        if isinstance(emb, LearnedTokenEmbedding):
            out[name] = emb
    return out


def learned_token_vectors(c: Components, applied: Applied) -> dict[str, Tensor]:
    """Text encoder name -> the learned token's embedding (dim,), fp32, detached.

    Works with the wrapper and with a plain matrix (a materialized or reloaded encoder).
    """
    if not applied.token_ids:
        return {}
    out = {}
    for name, te, tid in zip(c.text_encoder_names, c.text_encoders, applied.token_ids):
        emb = te.get_input_embeddings()
        row = emb.new_rows[tid - emb.first_new_id] if isinstance(emb, LearnedTokenEmbedding) else emb.weight[tid]
        out[name] = row.detach().float().clone()
    return out


def materialize_token(c: Components) -> None:
    """Replace each wrapper by a plain `nn.Embedding` holding the learned rows (base dtype).

    For a plain model (`models.save_pipeline`, export). After it, the token no longer trains:
    call it after training, not between steps.
    """
    for name, wrapper in token_modules(c).items():
        te = c.text_encoders[c.text_encoder_names.index(name)]
        w = wrapper.weight.detach().clone()
        plain = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(w)
        plain.requires_grad_(False)
        te.set_input_embeddings(plain)


# --------------------------------------------------------------------------------------------
# per-component strategies
# --------------------------------------------------------------------------------------------


# What a component may train: the VAE its decoder only (see the module docstring).
TRAINABLE_PREFIXES: dict[str, tuple[str, ...]] = {"vae": ("decoder.", "post_quant_conv.")}


def _may_train(component_name: str, param_name: str) -> bool:
    prefixes = TRAINABLE_PREFIXES.get(_family(component_name))
    return prefixes is None or param_name.startswith(prefixes)


def _frozen(module: nn.Module, comp: ComponentStrategy, component_name: str) -> list[nn.Parameter]:
    module.requires_grad_(False)
    return []


def _full(module: nn.Module, comp: ComponentStrategy, component_name: str) -> list[nn.Parameter]:
    # Trainable weights in fp32 (diffusers' scripts: fp32 master weights, autocast for compute).
    cast_module(module, torch.float32)
    module.requires_grad_(False)
    params = [p for n, p in module.named_parameters() if _may_train(component_name, n)]
    for p in params:
        p.requires_grad_(True)
    return params


def _lora_targets(comp: ComponentStrategy, component_name: str) -> list[str] | str:
    targets = list(comp.target_modules or DEFAULT_TARGETS[_family(component_name)])
    prefixes = TRAINABLE_PREFIXES.get(_family(component_name))
    if prefixes is None:
        return targets
    # peft full-matches a string target against each module name: adapt only the decoder.
    where = "|".join(re.escape(p.rstrip(".")) for p in prefixes)
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:{where})(?:\..*)?\.(?:{names})"


def lora_config(comp: ComponentStrategy, component_name: str) -> LoraConfig:
    return LoraConfig(
        r=comp.rank,
        lora_alpha=comp.lora_alpha,
        lora_dropout=comp.dropout,
        target_modules=_lora_targets(comp, component_name),
        # gaussian A, zero B: the adapted model starts exactly at the base model.
        init_lora_weights="gaussian",
    )


def _lora(module: nn.Module, comp: ComponentStrategy, component_name: str) -> list[nn.Parameter]:
    module.requires_grad_(False)
    config = lora_config(comp, component_name)
    try:
        # diffusers models (UNet, VAE) and transformers models (CLIP) both expose add_adapter;
        # it is what diffusers' training scripts call and what `load_lora_weights` mirrors.
        module.add_adapter(config)
    except ValueError as e:
        raise ValueError(
            f"strategy.{component_name}.target_modules {config.target_modules}: {e}"
        ) from None
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"strategy.{component_name}: LoRA found no module to adapt")
    for p in params:
        p.data = p.data.to(torch.float32)
    return params


Strategy = Callable[[nn.Module, ComponentStrategy, str], list[nn.Parameter]]


# --------------------------------------------------------------------------------------------
# saving and loading, per mode (what a trial writes; what sampling loads back)
# --------------------------------------------------------------------------------------------

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_FILES = {"text_encoder": "learned_embeds.safetensors", "text_encoder_2": "learned_embeds_2.safetensors"}
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass
class SaveContext:
    """What a saver reads and where it writes: the live components, the strategy, the output
    folder and the manifest (`sar_ray_outputs.json`) it fills in."""

    c: Components
    applied: Applied
    strategy: StrategyConfig
    out: Path
    manifest: dict[str, Any]
    ema_unet_state: dict[str, Tensor] | None = None


def _save_lora(ctx: SaveContext, names: list[str]) -> None:
    """UNet / text-encoder LoRA: one diffusers file, with the adapter configs as metadata so
    `load_lora_weights` rebuilds the same alpha / targets. VAE LoRA: diffusers has no VAE LoRA
    loader, so the merged VAE folder plus the raw peft adapter."""
    from .checkpoint import save_lora_file, save_vae_lora

    modules = ctx.c.modules()
    pipeline_names = [n for n in names if n != "vae"]
    if pipeline_names:
        save_lora_file(ctx.c, {n: modules[n] for n in pipeline_names}, ctx.out / LORA_FILE)
        ctx.manifest["lora"] = {"file": LORA_FILE, "components": pipeline_names}
    if "vae" in names:
        save_vae_lora(modules["vae"], ctx.out)
        ctx.manifest["folders"]["vae"] = "vae"
        ctx.manifest["vae_lora"] = "vae_lora"


def _save_full(ctx: SaveContext, names: list[str]) -> None:
    """Fully tuned components as `save_pretrained` folders (+ the tokenizer that goes with an
    encoder that owns the learned token)."""
    from .checkpoint import save_full_component

    for name in names:
        module = ctx.c.modules()[name]
        ema = ctx.ema_unet_state if name == "unet" else None
        save_full_component(module, ctx.out / name, ema_state=ema)
        ctx.manifest["folders"][name] = name
        ctx.manifest["ema_unet"] = ctx.manifest["ema_unet"] or ema is not None
        if name in TOKENIZER_OF and ctx.applied.token_ids is not None:
            tok_name = TOKENIZER_OF[name]
            ctx.c.tokenizers[ctx.c.tokenizer_names.index(tok_name)].save_pretrained(ctx.out / tok_name)
            ctx.manifest["folders"][tok_name] = tok_name


def _save_token(ctx: SaveContext, names: list[str]) -> None:
    """One textual-inversion file per encoder that is not saved whole (a full encoder's folder
    already holds the row, and its tokenizer the token)."""
    from .checkpoint import write_safetensors

    token = ctx.applied.token_string or ctx.strategy.token_string
    files = {}
    for name, vec in learned_token_vectors(ctx.c, ctx.applied).items():
        if ctx.applied.modes.get(name) == "full":
            continue
        # {token: (1, dim)}: the layout diffusers' textual_inversion*.py scripts write.
        write_safetensors({token: vec.unsqueeze(0)}, ctx.out / EMBEDS_FILES[name])
        files[name] = EMBEDS_FILES[name]
    ctx.manifest["token"] = {"string": token, "files": files}


def _load_full(pipe, out: Path, manifest: dict) -> None:
    from .checkpoint import load_full_component

    for name, folder in manifest["folders"].items():
        load_full_component(pipe, name, out / folder)


def _load_token(pipe, out: Path, manifest: dict) -> None:
    if not manifest.get("token"):
        return
    token = manifest["token"]["string"]
    for name, file in manifest["token"]["files"].items():
        kw = {} if name == "text_encoder" else {"text_encoder": getattr(pipe, name),
                                                "tokenizer": getattr(pipe, TOKENIZER_OF[name])}
        pipe.load_textual_inversion(str(out / file), token=token, **kw)


def _load_lora(pipe, out: Path, manifest: dict) -> None:
    if manifest.get("lora"):
        pipe.load_lora_weights(str(out), weight_name=manifest["lora"]["file"])


@dataclass(frozen=True)
class Mode:
    """One way a component (or the token) trains, with everything that follows from it."""

    apply: Strategy | None  # -> its trainable parameters (None: the token, added by `apply`)
    save: Callable[[SaveContext, list[str]], None] | None  # writes the components in this mode
    load: Callable[[Any, Path, dict], None] | None  # puts them back into a base pipeline
    trains: bool = True


MODES: dict[str, Mode] = {
    "frozen": Mode(_frozen, save=None, load=None, trains=False),
    "full": Mode(_full, save=_save_full, load=_load_full),
    "lora": Mode(_lora, save=_save_lora, load=_load_lora),
}
TOKEN = Mode(None, save=_save_token, load=_load_token)
# Loading order into a base pipeline: full folders replace components, then the token (into
# text encoders without adapters yet), then the LoRA file.
LOAD_ORDER: tuple[Mode, ...] = (MODES["full"], TOKEN, MODES["lora"])
# The apply functions by mode name (kept for callers that dispatch on `cfg.mode`).
STRATEGIES: dict[str, Strategy] = {name: m.apply for name, m in MODES.items()}


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------


def _sdxl_unused_parameters(text_encoder: nn.Module) -> list[nn.Parameter]:
    # transformers 5 puts the layers on CLIPTextModel itself; 4.x under `.text_model`.
    tm = getattr(text_encoder, "text_model", text_encoder)
    return [*tm.encoder.layers[-1].parameters(), *tm.final_layer_norm.parameters()]


@dataclass
class Applied:
    """What trains: optimizer groups, each component's mode, and the new token's ids."""

    param_groups: list[dict]  # AdamW groups: {"params", "lr", "name"}
    modes: dict[str, str]  # component -> "frozen" | "full" | "lora"
    token_ids: list[int] | None  # new token id in each tokenizer (token == "learn")
    named_params: dict[str, nn.Parameter] = field(default_factory=dict)  # "<component>.<param name>"
    token_string: str | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def component_strategies(c: Components, s: StrategyConfig) -> dict[str, ComponentStrategy]:
    out = {"unet": s.unet}
    out.update(zip(c.text_encoder_names, s.text_encoder_strategies(len(c.text_encoders))))
    out["vae"] = s.vae
    return out


def full_components(s: StrategyConfig) -> set[str]:
    """Components a strategy tunes fully: `models.load_components(cfg.model, keep_fp32=...)`
    then loads them in fp32 instead of rounding them through weight_dtype first.
    (Names the model lacks, such as text_encoder_2 of an SD 1.x model, are ignored there.)"""
    comps = {"unet": s.unet, "vae": s.vae}
    comps.update(zip(["text_encoder", "text_encoder_2"], s.text_encoder_strategies(2)))
    return {n for n, cs in comps.items() if cs.mode == "full"}


def apply(c: Components, s: StrategyConfig, default_lr: float) -> Applied:
    """Set up `c` for training under strategy `s`; returns the optimizer groups.

    Order matters: the token is added first (resizing replaces embedding matrices), then each
    component's strategy, then the token wrappers (after LoRA injection, which freezes every
    non-LoRA parameter it sees), then one sweep sets `requires_grad` from the groups.
    Any component whose mode name is not in `MODES` is refused with the valid names.
    """
    strategies = component_strategies(c, s)
    modules = c.modules()
    for name, comp in strategies.items():
        if comp.mode not in MODES:
            raise ValueError(f"strategy.{name}.mode {comp.mode!r}: valid modes are {', '.join(MODES)}")

    token_ids = None
    if s.token == "learn":
        token_ids, _ = _add_token(c, s)

    groups: list[dict] = []
    for name, comp in strategies.items():
        params = MODES[comp.mode].apply(modules[name], comp, name)
        if params:
            groups.append({"params": params, "lr": comp.lr or default_lr, "name": name})

    if token_ids is not None:
        token_params = []
        for te, name, tid in zip(c.text_encoders, c.text_encoder_names, token_ids):
            # Every mode, `full` included: the new row trains at token_lr in its own group (a
            # full encoder's base matrix stays in the encoder's group, at the encoder's rate).
            wrapper = LearnedTokenEmbedding(te.get_input_embeddings(), first_new_id=tid)
            te.set_input_embeddings(wrapper)
            token_params.append(wrapper.new_rows)
        if token_params:
            groups.append({"params": token_params, "lr": s.token_lr or default_lr, "name": "token"})

    # SDXL conditions on the penultimate hidden states and discards text_encoder's pooled
    # output, so its last layer and final norm never get a gradient: leave them out (DDP
    # would otherwise stop on unused parameters, and weight decay would shrink them for nothing).
    if c.kind == "sdxl":
        unused = {id(p) for p in _sdxl_unused_parameters(c.text_encoders[0])}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in unused]
        groups = [g for g in groups if g["params"]]

    trainable = {id(p) for g in groups for p in g["params"]}
    named: dict[str, nn.Parameter] = {}
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            p.requires_grad_(id(p) in trainable)
            if id(p) in trainable:
                named[f"{name}.{pname}"] = p
    assert len(named) == len(trainable), "a trainable parameter is outside the components"
    return Applied(
        param_groups=groups,
        modes={name: comp.mode for name, comp in strategies.items()},
        token_ids=token_ids,
        named_params=named,
        token_string=s.token_string if token_ids is not None else None,
    )


# --------------------------------------------------------------------------------------------
# placing a strategy on a device (what the training loop and the GPU check both run)
# --------------------------------------------------------------------------------------------


def place(c: Components, applied: Applied, device: torch.device, weight_dtype: str, vae_upcast: bool) -> None:
    """Frozen weights in `weight_dtype`, trainable ones fp32 (mixed precision keeps fp32
    master weights; AdamW on bf16 weights loses small updates). A fully tuned component stays
    fp32 whole: its few frozen parameters (SDXL's unused last text-encoder layer and final
    norm, a tuned VAE's encoder) would otherwise meet fp32 activations in bf16 ("mixed dtype")."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[weight_dtype]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 kernels are missing or slow on CPU
    trainable = {id(p) for p in applied.trainable_parameters()}
    for name, module in c.modules().items():
        upcast = (name == "vae" and vae_upcast) or applied.modes.get(name) == "full"
        mod_dtype = torch.float32 if upcast else dtype
        module.to(device)
        for p in module.parameters():
            p.data = p.data.to(torch.float32 if id(p) in trainable else mod_dtype)


def enable_checkpointing(c: Components, applied: Applied, token: bool) -> None:
    """Gradient checkpointing wherever a gradient passes: the UNet whenever anything at or
    before it trains (a trainable text encoder or token gets its gradient through the UNet's
    activations, frozen or not), each text encoder that trains. Checkpointing is active only
    in train mode, so those modules are put in it (SD/SDXL have no dropout in them)."""
    text_trains = token or any(applied.modes.get(n, "frozen") != "frozen" for n in c.text_encoder_names)
    if applied.modes.get("unet") != "frozen" or text_trains:
        c.unet.enable_gradient_checkpointing()
        c.unet.train()
    for name, te in zip(c.text_encoder_names, c.text_encoders):
        if token or applied.modes.get(name, "frozen") != "frozen":
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            te.train()


def make_optimizer(applied: Applied, cfg: TrialConfig) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    groups = [
        {"params": g["params"], "lr": g["lr"], "name": g.get("name", "")} for g in applied.param_groups if g["params"]
    ]
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        except ImportError:
            warnings.warn("train.optimizer=adamw8bit needs bitsandbytes (pip install 'sar-ray[gpu]'); using adamw")
    return torch.optim.AdamW(groups, **kwargs)
