"""What a trial learned, saved in formats plain diffusers loads, and resume state. No pickle.

Outputs of a trial (`save_outputs`), all optional, described by `sar_ray_outputs.json`:

    pytorch_lora_weights.safetensors   UNet / text encoder LoRA   pipe.load_lora_weights(out)
    learned_embeds.safetensors         <SAR> row, text_encoder    pipe.load_textual_inversion(...)
    learned_embeds_2.safetensors       <SAR> row, text_encoder_2  (SDXL; text_encoder_2=, tokenizer_2=)
    unet/ text_encoder/ text_encoder_2/ vae/   fully tuned components (save_pretrained)
    tokenizer/ tokenizer_2/            with <SAR>, next to a fully tuned encoder that owns it
    vae/ + vae_lora/                   VAE LoRA: merged VAE (diffusers cannot load VAE LoRA)
                                       and the raw peft adapter

`load_outputs_into_pipeline(pipe, out)` is the one path that puts them into a base pipeline.

Resume state (`save_state` / `load_state`): `state.safetensors` + `state.json` in a folder,
with the optimizer flattened to tensors + JSON (`optimizer_state_to_tensors`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sar_ray.config import StrategyConfig
from sar_ray.models import Components, cast_module
from sar_ray.strategies import (
    EMBEDS_FILES,
    LOAD_ORDER,
    LORA_FILE,
    MODES,
    TOKEN,
    TOKENIZER_OF,
    Applied,
    LearnedTokenEmbedding,
    SaveContext,
)

MANIFEST = "sar_ray_outputs.json"
FOLDER_CLASSES: dict[str, type] = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}
# Everything save_outputs may write: cleared first so a re-save never leaves stale parts.
_OWNED = [MANIFEST, LORA_FILE, *EMBEDS_FILES.values(), *FOLDER_CLASSES, *TOKENIZER_OF.values(), "vae_lora"]


# --------------------------------------------------------------------------------------------
# trial outputs
# --------------------------------------------------------------------------------------------


def _lora_state(module: nn.Module) -> dict[str, Tensor]:
    # diffusers' training scripts: peft names -> diffusers names. save_embedding_layers=False:
    # the learned token travels as a textual-inversion file, never inside the LoRA file.
    sd = get_peft_model_state_dict(module, save_embedding_layers=False)
    return convert_state_dict_to_diffusers(sd)


def _merged_lora_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict with every LoRA delta folded into its base weight, adapter keys
    dropped and peft's `.base_layer` names undone. The live module is not modified."""
    merged = {}
    for mname, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and "default" in sub.lora_A:
            base = sub.get_base_layer()
            with torch.no_grad():
                delta = sub.get_delta_weight("default")
            merged[f"{mname}.weight"] = (base.weight.detach().float() + delta.float()).to(base.weight.dtype)
    out = {}
    for k, v in module.state_dict().items():
        if ".lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        out[k] = merged.get(k, v)
    return out


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a crash never leaves half a file under the final name."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)



def _save_unet_with_state(unet: UNet2DConditionModel, state: dict[str, Tensor], folder: Path) -> None:
    """A `from_pretrained`-loadable UNet folder holding `state` (e.g. EMA) instead of the live weights."""
    live = unet.state_dict()
    unknown = set(state) - set(live)
    if unknown:
        raise ValueError(f"ema_unet_state has keys the UNet does not: {sorted(unknown)[:5]}")
    missing = {n for n, _ in unet.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"ema_unet_state lacks UNet parameters: {sorted(missing)[:5]}")
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(folder)
    full = {k: state.get(k, v).to(v.dtype) for k, v in live.items()}
    write_safetensors(full, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


class _plain_token_embedding:
    """While saving a fully tuned encoder: its learned-token wrapper swapped for the plain
    `nn.Embedding` it stands for (learned rows written in), so the folder is a plain
    CLIPTextModel; the wrapper is put back afterwards and training may go on."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.wrapper = None

    def __enter__(self):
        emb = self.module.get_input_embeddings() if hasattr(self.module, "get_input_embeddings") else None
        if isinstance(emb, LearnedTokenEmbedding):
            self.wrapper = emb
            w = emb.weight.detach()
            plain = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
            with torch.no_grad():
                plain.weight.copy_(w)
            self.module.set_input_embeddings(plain)
        return self.module

    def __exit__(self, *exc):
        if self.wrapper is not None:
            self.module.set_input_embeddings(self.wrapper)


def save_full_component(module: nn.Module, folder: Path, ema_state: dict[str, Tensor] | None = None) -> None:
    """A fully tuned component as a `from_pretrained` folder (the EMA weights when given)."""
    if ema_state is not None:
        _save_unet_with_state(module, ema_state, folder)
        return
    with _plain_token_embedding(module) as plain:
        plain.save_pretrained(folder, safe_serialization=True)


def load_full_component(pipe, name: str, folder: Path) -> None:
    """Replace `pipe.<name>` by the saved folder, in the pipeline's dtype and device."""
    old = getattr(pipe, name, None)
    if name.startswith("tokenizer"):
        setattr(pipe, name, CLIPTokenizer.from_pretrained(folder))
        return
    cls = FOLDER_CLASSES[name]
    dtype = getattr(old, "dtype", torch.float32)
    kw = {"dtype": dtype} if name.startswith("text_encoder") else {"torch_dtype": dtype}
    new = cls.from_pretrained(folder, **kw)
    if old is not None:
        new.to(old.device)
    setattr(pipe, name, new)


def save_lora_file(c: Components, modules: dict[str, nn.Module], path: Path) -> None:
    """UNet / text-encoder adapters in diffusers' LoRA file (what `load_lora_weights` reads)."""
    layers = {f"{n}_lora_layers": _lora_state(m) for n, m in modules.items()}
    metadata = {f"{n}_lora_adapter_metadata": m.peft_config["default"].to_dict() for n, m in modules.items()}
    pipeline_cls = StableDiffusionXLPipeline if c.kind == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True, **layers, **metadata)


def save_vae_lora(vae: AutoencoderKL, out: Path) -> None:
    """`vae/`: the VAE with its LoRA merged (diffusers cannot load VAE adapters); `vae_lora/`:
    the raw peft adapter."""
    merged = cast_module(AutoencoderKL.from_config(vae.config), vae.dtype)
    merged.load_state_dict(_merged_lora_state(vae), strict=True)
    merged.save_pretrained(out / "vae", safe_serialization=True)
    adapter = out / "vae_lora"
    adapter.mkdir()
    vae.peft_config["default"].save_pretrained(adapter)
    write_safetensors(
        get_peft_model_state_dict(vae, save_embedding_layers=False),
        adapter / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )


def save_outputs(
    c: Components,
    applied: Applied,
    s: StrategyConfig,
    out_dir: str | os.PathLike,
    ema_unet_state: dict[str, Tensor] | None = None,
) -> list[Path]:
    """Write what the trial learned under `out_dir`, each mode through its registry entry
    (`strategies.MODES`, `strategies.TOKEN`); returns the files written.

    Reads the live modules (LoRA layers and token wrappers stay in place): training may go on
    after a save. Call on rank 0 with the unwrapped modules (not the DDP wrapper). Raises
    when a trainable mode has no saver: its training would otherwise be lost and the trial
    scored as the base model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    modes = applied.modes
    manifest: dict[str, Any] = {
        "format": 1,
        "kind": c.kind,
        "family": c.family,
        "base": c.source,
        "strategy": s.slug,
        "modes": dict(modes),
        "lora": None,
        "folders": {},
        "token": None,
        "vae_lora": None,
        "ema_unet": False,
    }
    ctx = SaveContext(c, applied, s, out, manifest, ema_unet_state)
    for mode_name, mode in MODES.items():
        names = [n for n in c.modules() if modes.get(n) == mode_name]
        if not names:
            continue
        if mode.save is None:
            if mode.trains:
                raise ValueError(f"strategy mode {mode_name!r} of {', '.join(names)} trains but has no saver "
                                 "(strategies.MODES): its weights would be lost")
            continue
        mode.save(ctx, names)
    if applied.token_ids is not None:
        TOKEN.save(ctx, [])

    written = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = [str(p.relative_to(out)) for p in written]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
    return written + [out / MANIFEST]


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sar-ray outputs here (written by checkpoint.save_outputs)")
    return json.loads(path.read_text())


def load_outputs_into_pipeline(pipe, out_dir: str | os.PathLike):
    """Load a trial's outputs into a base SD / SDXL pipeline (in place; returns `pipe`), each
    mode through its registry entry, in `strategies.LOAD_ORDER` (full folders, then the
    token, then the LoRA file). Components keep the pipeline's dtype and device."""
    out = Path(out_dir)
    m = read_manifest(out)
    for mode in LOAD_ORDER:
        mode.load(pipe, out, m)
    _pool_at_eos(pipe)
    return pipe


def _pool_at_eos(pipe) -> None:
    """The learned token's id is above `<|endoftext|>`: point each (hub-loaded) text encoder's
    pooling at the real eos id (see `models.pool_at_eos`)."""
    for te_name, tok_name in TOKENIZER_OF.items():
        te, tok = getattr(pipe, te_name, None), getattr(pipe, tok_name, None)
        if te is not None and tok is not None and te.config.eos_token_id != tok.eos_token_id:
            te.config.eos_token_id = tok.eos_token_id
            tm = getattr(te, "text_model", te)
            if hasattr(tm, "eos_token_id"):
                tm.eos_token_id = tok.eos_token_id


# --------------------------------------------------------------------------------------------
# resume state
# --------------------------------------------------------------------------------------------

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"


def save_state(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write `state.safetensors` + `state.json` into folder `path`, each atomically.

    The tensor file is renamed into place first and the JSON last; both carry one random id,
    so `load_state` detects a pair torn by a crash between the two renames.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state_id = uuid.uuid4().hex
    write_safetensors(tensors, folder / STATE_TENSORS, metadata={"state_id": state_id})
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{STATE_META}.")
    with os.fdopen(fd, "w") as f:
        json.dump({"state_id": state_id, "meta": meta}, f, indent=1)
    os.replace(tmp, folder / STATE_META)


def load_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    folder = Path(path)
    doc = json.loads((folder / STATE_META).read_text())
    with safe_open(str(folder / STATE_TENSORS), framework="pt") as f:
        file_id = (f.metadata() or {}).get("state_id")
    if file_id != doc["state_id"]:
        raise ValueError(f"{folder}: state.safetensors and state.json come from different saves")
    return load_file(str(folder / STATE_TENSORS)), doc["meta"]


def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of a nested state; tensors go to `tensors` under their path."""
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}


def optimizer_state_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, Tensor], dict]:
    """A torch optimizer's state_dict as (tensors, JSON-able meta): exact, no pickle."""
    tensors: dict[str, Tensor] = {}
    meta = _encode(opt.state_dict(), prefix, tensors)
    return tensors, {"optimizer": meta}


def optimizer_state_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    opt.load_state_dict(_decode(meta["optimizer"], tensors))


def trainable_state(applied: Applied) -> dict[str, Tensor]:
    """`<component>.<parameter name>` -> the trainable tensor (detached, not copied)."""
    return {name: p.detach() for name, p in applied.named_params.items()}


def load_trainable_state(applied: Applied, tensors: dict[str, Tensor]) -> None:
    """Copy saved trainable tensors into the live parameters (names must match exactly)."""
    names = set(applied.named_params)
    missing, unexpected = names - set(tensors), set(tensors) - names
    if missing or unexpected:
        raise ValueError(
            f"trainable state does not match this strategy: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for name, p in applied.named_params.items():
            p.copy_(tensors[name])
