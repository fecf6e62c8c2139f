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
from sar_ray.strategies import Applied, learned_token_vectors

MANIFEST = "sar_ray_outputs.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_FILES = {"text_encoder": "learned_embeds.safetensors", "text_encoder_2": "learned_embeds_2.safetensors"}
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
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


def _write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
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
    _write_safetensors(full, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def save_outputs(
    c: Components,
    applied: Applied,
    s: StrategyConfig,
    out_dir: str | os.PathLike,
    ema_unet_state: dict[str, Tensor] | None = None,
) -> list[Path]:
    """Write what the trial learned under `out_dir`; returns the files written.

    Reads the live modules (LoRA layers and token wrappers stay in place): training may go on
    after a save. Call on rank 0 with the unwrapped modules (not the DDP wrapper).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    modules = c.modules()
    modes = applied.modes
    manifest: dict[str, Any] = {
        "format": 1,
        "kind": c.kind,
        "base": c.source,
        "strategy": s.slug,
        "modes": dict(modes),
        "lora": None,
        "folders": {},
        "token": None,
        "vae_lora": None,
        "ema_unet": False,
    }

    # 1. LoRA of the UNet and text encoders: one diffusers file, with the adapter configs as
    #    metadata so load_lora_weights rebuilds the same alpha / targets.
    lora_names = [n for n in ("unet", *c.text_encoder_names) if modes.get(n) == "lora"]
    if lora_names:
        layers = {f"{n}_lora_layers": _lora_state(modules[n]) for n in lora_names}
        metadata = {f"{n}_lora_adapter_metadata": modules[n].peft_config["default"].to_dict() for n in lora_names}
        pipeline_cls = StableDiffusionXLPipeline if c.kind == "sdxl" else StableDiffusionPipeline
        pipeline_cls.save_lora_weights(out, weight_name=LORA_FILE, safe_serialization=True, **layers, **metadata)
        manifest["lora"] = {"file": LORA_FILE, "components": lora_names}

    # 2. Fully tuned components (+ the tokenizer that goes with a resized encoder).
    for name, module in modules.items():
        if modes.get(name) != "full":
            continue
        if name == "unet" and ema_unet_state is not None:
            _save_unet_with_state(module, ema_unet_state, out / "unet")
            manifest["ema_unet"] = True
        else:
            module.save_pretrained(out / name, safe_serialization=True)
        manifest["folders"][name] = name
        if name in TOKENIZER_OF and applied.token_ids is not None:
            tok_name = TOKENIZER_OF[name]
            c.tokenizers[c.tokenizer_names.index(tok_name)].save_pretrained(out / tok_name)
            manifest["folders"][tok_name] = tok_name

    # 3. The learned token, one textual-inversion file per encoder that is not saved whole.
    if applied.token_ids is not None:
        token = applied.token_string or s.token_string
        files = {}
        for name, vec in learned_token_vectors(c, applied).items():
            if modes.get(name) == "full":
                continue  # inside text_encoder*/ and tokenizer*/ already
            # {token: (1, dim)}: the layout diffusers' textual_inversion*.py scripts write.
            _write_safetensors({token: vec.unsqueeze(0)}, out / EMBEDS_FILES[name])
            files[name] = EMBEDS_FILES[name]
        manifest["token"] = {"string": token, "files": files}

    # 4. VAE LoRA: diffusers has no VAE LoRA loader, so ship the merged VAE and the adapter.
    if modes.get("vae") == "lora":
        vae = modules["vae"]
        merged = cast_module(AutoencoderKL.from_config(vae.config), vae.dtype)
        merged.load_state_dict(_merged_lora_state(vae), strict=True)
        merged.save_pretrained(out / "vae", safe_serialization=True)
        manifest["folders"]["vae"] = "vae"
        adapter = out / "vae_lora"
        adapter.mkdir()
        vae.peft_config["default"].save_pretrained(adapter)
        _write_safetensors(
            get_peft_model_state_dict(vae, save_embedding_layers=False),
            adapter / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        manifest["vae_lora"] = "vae_lora"

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
    """Load a trial's outputs into a base SD / SDXL pipeline (in place; returns `pipe`).

    Order: full folders replace components, then the token (textual inversion, into a text
    encoder without adapters yet), then the LoRA file. Components keep the pipeline's dtype
    and device.
    """
    out = Path(out_dir)
    m = read_manifest(out)
    for name, folder in m["folders"].items():
        old = getattr(pipe, name, None)
        if name.startswith("tokenizer"):
            setattr(pipe, name, CLIPTokenizer.from_pretrained(out / folder))
            continue
        cls = FOLDER_CLASSES[name]
        dtype = getattr(old, "dtype", torch.float32)
        kw = {"dtype": dtype} if name.startswith("text_encoder") else {"torch_dtype": dtype}
        new = cls.from_pretrained(out / folder, **kw)
        if old is not None:
            new.to(old.device)
        setattr(pipe, name, new)
    if m.get("token"):
        token = m["token"]["string"]
        for name, file in m["token"]["files"].items():
            if name == "text_encoder":
                pipe.load_textual_inversion(str(out / file), token=token)
            else:
                pipe.load_textual_inversion(
                    str(out / file),
                    token=token,
                    text_encoder=getattr(pipe, name),
                    tokenizer=getattr(pipe, TOKENIZER_OF[name]),
                )
    if m.get("lora"):
        pipe.load_lora_weights(str(out), weight_name=m["lora"]["file"])
    return pipe


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
    _write_safetensors(tensors, folder / STATE_TENSORS, metadata={"state_id": state_id})
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
