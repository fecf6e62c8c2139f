"""How each component trains: `frozen`, `full` or `lora`, plus the learned `<SAR>` token.

    applied = apply(components, cfg.strategy, default_lr=cfg.train.lr)
    opt = torch.optim.AdamW(applied.param_groups, weight_decay=...)

`apply` is the single place that decides `requires_grad`: after it returns, exactly the
parameters in `applied.param_groups` are trainable (fp32), everything else is frozen.

The learned token. Textual inversion trains one row of the token embedding matrix. Putting
the whole matrix in the optimizer would move every other row too (AdamW weight decay shrinks
them, and a LoRA-tuned or frozen text encoder must keep them exact), so diffusers' script
restores the other rows after each step. Here the embedding is replaced by
:class:`LearnedTokenEmbedding`: the frozen base matrix plus a small trainable `(n_new, dim)`
parameter substituted for the new ids, so the optimizer never sees the other rows at all.
When the text encoder is `full`, its whole embedding trains anyway and there is no wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import Tensor, nn

from sar_ray.config import ComponentStrategy, StrategyConfig
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

    `base` stays frozen (and may be fp16/bf16); `new_rows` is (n_new, dim) fp32. Forward equals
    `nn.Embedding` with the new rows written into the matrix.
    """

    def __init__(self, base: nn.Embedding, first_new_id: int):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new_rows = nn.Parameter(base.weight.detach()[first_new_id:].to(torch.float32).clone())
        base.requires_grad_(False)

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

    Works with the wrapper and with a fully tuned encoder (row read from its matrix).
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


def _frozen(module: nn.Module, comp: ComponentStrategy, component_name: str) -> list[nn.Parameter]:
    module.requires_grad_(False)
    return []


def _full(module: nn.Module, comp: ComponentStrategy, component_name: str) -> list[nn.Parameter]:
    # Trainable weights in fp32 (diffusers' scripts: fp32 master weights, autocast for compute).
    cast_module(module, torch.float32)
    module.requires_grad_(True)
    return list(module.parameters())


def lora_config(comp: ComponentStrategy, component_name: str) -> LoraConfig:
    return LoraConfig(
        r=comp.rank,
        lora_alpha=comp.lora_alpha,
        lora_dropout=comp.dropout,
        target_modules=list(comp.target_modules or DEFAULT_TARGETS[_family(component_name)]),
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
STRATEGIES: dict[str, Strategy] = {"frozen": _frozen, "full": _full, "lora": _lora}


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
    """
    strategies = component_strategies(c, s)
    modules = c.modules()
    for name, comp in strategies.items():
        if comp.mode not in STRATEGIES:
            raise ValueError(f"strategy.{name}.mode {comp.mode!r}: valid modes are {', '.join(STRATEGIES)}")

    token_ids = None
    if s.token == "learn":
        token_ids, _ = _add_token(c, s)

    groups: list[dict] = []
    for name, comp in strategies.items():
        params = STRATEGIES[comp.mode](modules[name], comp, name)
        if params:
            groups.append({"params": params, "lr": comp.lr or default_lr, "name": name})

    if token_ids is not None:
        token_params = []
        for te, name, tid in zip(c.text_encoders, c.text_encoder_names, token_ids):
            if strategies[name].mode == "full":
                continue  # the whole matrix (new row included) is already in this encoder's group
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
