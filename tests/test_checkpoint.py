"""checkpoint.py: what a trial saves loads into PLAIN diffusers and reproduces the trained model;
resume state round-trips exactly; nothing is pickled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sar_ray import checkpoint, models, strategies
from sar_ray.config import load

PROMPT = "<SAR> image of open water with a ship"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """A saved tiny base pipeline per kind: what a user's base model folder would be."""
    return {k: models.save_pipeline(models.build_tiny(k), tmp_path_factory.mktemp(f"base-{k}")) for k in ("sd", "sdxl")}


def strategy(*sets: str):
    return load(None, ["strategy.unet.mode=frozen", *sets]).strategy


def train(c, applied, steps: int = 3, lr: float = 3e-2) -> torch.optim.AdamW:
    """A few large AdamW steps (noise-prediction MSE + VAE reconstruction) so every learned
    part differs clearly from the base model."""
    for m in c.modules().values():
        m.train()
    opt = torch.optim.AdamW([dict(g, lr=lr) for g in applied.param_groups], weight_decay=1e-2)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
        posterior = c.vae.encode(images).latent_dist
        latents = posterior.mean.detach() * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        emb, pooled = models.encode_text(c, [PROMPT, "<SAR> a forest"], "cpu")
        pred = c.unet(c.noise_scheduler.add_noise(latents, noise, t), t, emb, **_added(c, pooled)).sample
        loss = F.mse_loss(pred, noise)
        if applied.modes["vae"] != "frozen":
            loss = loss + F.mse_loss(c.vae.decode(posterior.sample(generator=g)).sample, images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for m in c.modules().values():
        m.eval()
    return opt


def _added(c, pooled) -> dict:
    if c.kind != "sdxl":
        return {}
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(pooled.shape[0], 1)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def live_conditioning(c):
    with torch.no_grad():
        return models.encode_text(c, [PROMPT], "cpu")


def pipe_conditioning(pipe):
    with torch.no_grad():
        out = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[0], (out[2] if isinstance(pipe, StableDiffusionXLPipeline) else None)


def unet_out(unet, kind, emb, pooled):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    kw = {}
    if kind == "sdxl":
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]])}}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), emb, **kw).sample


def assert_only_safetensors_and_json(folder) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    bad = [p for p in files if p.suffix not in {".safetensors", ".json"}]
    assert not bad, f"non-safetensors/json files written: {bad}"


# -- LoRA + token into plain diffusers -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_and_token_load_into_plain_diffusers(kind, base_dirs, tmp_path):
    s = strategy("strategy.unet.mode=lora", "strategy.unet.alpha=8", "strategy.text_encoder.mode=lora", "strategy.token=learn")
    c = models.load_components(load(None, [f"model.pretrained={base_dirs[kind]}"]).model)
    applied = strategies.apply(c, s, default_lr=1e-3)
    train(c, applied)
    out = tmp_path / "out"
    files = checkpoint.save_outputs(c, applied, s, out)
    assert_only_safetensors_and_json(out)
    names = {p.name for p in files}
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "sar_ray_outputs.json"} <= names
    assert ("learned_embeds_2.safetensors" in names) == (kind == "sdxl")
    embeds = load_file(out / "learned_embeds.safetensors")
    assert list(embeds) == ["<SAR>"] and embeds["<SAR>"].shape == (1, 32)

    # Exactly what a user does with plain diffusers.
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(base_dirs[kind])
    base_unet = unet_out(pipe.unet, kind, *live_conditioning(c))
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(out / "learned_embeds.safetensors", token="<SAR>")
    if kind == "sdxl":
        pipe.load_textual_inversion(
            out / "learned_embeds_2.safetensors", token="<SAR>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    pipe.set_progress_bar_config(disable=True)
    emb, pooled = live_conditioning(c)
    if kind == "sdxl":
        # The hub configs say eos_token_id=2: transformers then pools at the largest id, the
        # added <SAR>, and every caption gets the same pooled embedding ...
        trap = pipe.encode_prompt("<SAR> image of a forest", device="cpu", do_classifier_free_guidance=False)[2]
        assert torch.equal(pipe_conditioning(pipe)[1], trap)
        # ... so a user of the hub base sets the real id, as the README shows.
        for te in (pipe.text_encoder, pipe.text_encoder_2):
            te.config.eos_token_id = getattr(te, "text_model", te).eos_token_id = 49407

    # The loaded pipeline is the trained model: same conditioning, same UNet output.
    p_emb, p_pooled = pipe_conditioning(pipe)
    torch.testing.assert_close(p_emb, emb, rtol=1e-5, atol=1e-5)
    if kind == "sdxl":
        torch.testing.assert_close(p_pooled, pooled, rtol=1e-5, atol=1e-5)
    live = unet_out(c.unet, kind, emb, pooled)
    torch.testing.assert_close(unet_out(pipe.unet, kind, emb, pooled), live, rtol=1e-5, atol=1e-5)
    assert (live - base_unet).abs().max() > 1e-3, "the UNet LoRA had no effect: the test would prove nothing"

    # ... and the token and text LoRA matter: the base pipeline conditions differently.
    fresh = cls.from_pretrained(base_dirs[kind])
    fresh.load_textual_inversion(out / "learned_embeds.safetensors", token="<SAR>")
    if kind == "sdxl":
        fresh.load_textual_inversion(
            out / "learned_embeds_2.safetensors", token="<SAR>", text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2
        )
    assert (pipe_conditioning(fresh)[0] - emb).abs().max() > 1e-3, "text-encoder LoRA had no effect"

    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # The one loader sar-ray itself uses gives the same model.
    again = checkpoint.load_outputs_into_pipeline(DiffusionPipeline.from_pretrained(base_dirs[kind]), out)
    torch.testing.assert_close(pipe_conditioning(again)[0], emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unet_out(again.unet, kind, emb, pooled), live, rtol=1e-5, atol=1e-5)


# -- full components, EMA, tokenizers ------------------------------------------------------------


def test_full_components_with_token_and_ema(base_dirs, tmp_path):
    s = strategy("strategy.unet.mode=full", "strategy.text_encoder.mode=full", "strategy.token=learn")
    c = models.load_components(load(None, [f"model.pretrained={base_dirs['sd']}"]).model)
    applied = strategies.apply(c, s, default_lr=1e-3)
    train(c, applied, steps=2)
    out = tmp_path / "out"
    ema = {n: p.detach() + 1.0 for n, p in c.unet.named_parameters()}
    checkpoint.save_outputs(c, applied, s, out, ema_unet_state=ema)
    assert_only_safetensors_and_json(out)
    manifest = json.loads((out / "sar_ray_outputs.json").read_text())
    assert manifest["ema_unet"] and set(manifest["folders"]) == {"unet", "text_encoder", "tokenizer"}
    assert manifest["token"] == {"string": "<SAR>", "files": {}}  # the token lives in text_encoder/ + tokenizer/
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    for n, p in loaded.named_parameters():
        assert torch.equal(p, ema[n]), n

    # Saving again without EMA replaces the folder with the live weights (nothing stale).
    checkpoint.save_outputs(c, applied, s, out)
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    for (n, p), (_, q) in zip(loaded.named_parameters(), c.unet.named_parameters()):
        assert torch.equal(p, q), n

    pipe = checkpoint.load_outputs_into_pipeline(DiffusionPipeline.from_pretrained(base_dirs["sd"]), out)
    assert pipe.tokenizer.convert_tokens_to_ids("<SAR>") == 49408
    emb, _ = live_conditioning(c)
    assert torch.equal(pipe_conditioning(pipe)[0], emb)


def test_sdxl_mixed_encoders_full_and_lora_with_token(base_dirs, tmp_path):
    s = strategy("strategy.text_encoder.mode=full", "strategy.text_encoder_2.mode=lora", "strategy.token=learn")
    c = models.load_components(load(None, [f"model.pretrained={base_dirs['sdxl']}"]).model)
    applied = strategies.apply(c, s, default_lr=1e-3)
    train(c, applied, steps=2)
    out = tmp_path / "out"
    checkpoint.save_outputs(c, applied, s, out)
    manifest = json.loads((out / "sar_ray_outputs.json").read_text())
    assert manifest["token"]["files"] == {"text_encoder_2": "learned_embeds_2.safetensors"}
    assert manifest["lora"]["components"] == ["text_encoder_2"]
    pipe = checkpoint.load_outputs_into_pipeline(DiffusionPipeline.from_pretrained(base_dirs["sdxl"]), out)
    emb, pooled = live_conditioning(c)
    p_emb, p_pooled = pipe_conditioning(pipe)
    torch.testing.assert_close(p_emb, emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_pooled, pooled, rtol=1e-5, atol=1e-5)


def test_vae_lora_saved_merged_and_as_adapter(base_dirs, tmp_path):
    s = strategy("strategy.vae.mode=lora")
    c = models.load_components(load(None, [f"model.pretrained={base_dirs['sd']}"]).model)
    applied = strategies.apply(c, s, default_lr=1e-3)
    train(c, applied, steps=2)
    out = tmp_path / "out"
    checkpoint.save_outputs(c, applied, s, out)
    assert_only_safetensors_and_json(out)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    adapter = load_file(out / "vae_lora" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    merged = AutoencoderKL.from_pretrained(out / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    base = AutoencoderKL.from_pretrained(base_dirs["sd"], subfolder="vae")
    with torch.no_grad():
        live, got, orig = (m.decode(z).sample for m in (c.vae, merged, base))
    torch.testing.assert_close(got, live, rtol=1e-4, atol=1e-5)
    assert (live - orig).abs().max() > 1e-3
    # the sampler's loader swaps the merged VAE in
    pipe = checkpoint.load_outputs_into_pipeline(DiffusionPipeline.from_pretrained(base_dirs["sd"]), out)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(z).sample, live, rtol=1e-4, atol=1e-5)


# -- resume state ---------------------------------------------------------------------------------


def test_state_round_trip_is_exact_and_atomic(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b.bf16": torch.randn(5).to(torch.bfloat16),
        "step": torch.tensor(7.0),
        "ids": torch.arange(4),
    }
    meta = {"step": 7, "epoch": 1, "name": "trial-0", "lrs": [1e-4, 5e-3]}
    checkpoint.save_state(tmp_path / "s", tensors, meta)
    got, got_meta = checkpoint.load_state(tmp_path / "s")
    assert got_meta == meta and got.keys() == tensors.keys()
    for k in tensors:
        assert got[k].dtype == tensors[k].dtype and torch.equal(got[k], tensors[k]), k
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.json", "state.safetensors"]
    # A crash between the two renames leaves a pair from different saves: refused, not mixed.
    first = (tmp_path / "s" / "state.json").read_text()
    checkpoint.save_state(tmp_path / "s", {"a": torch.zeros(1)}, {"step": 8})
    (tmp_path / "s" / "state.json").write_text(first)
    with pytest.raises(ValueError, match="different saves"):
        checkpoint.load_state(tmp_path / "s")


def test_optimizer_and_trainable_state_resume_exactly(tmp_path):
    s = strategy("strategy.unet.mode=lora", "strategy.text_encoder.mode=lora", "strategy.token=learn", "strategy.token_lr=5e-3")

    def fresh():
        c = models.build_tiny("sd")
        return c, strategies.apply(c, s, default_lr=1e-3)

    c, applied = fresh()
    opt = train(c, applied, steps=2)
    t_params = checkpoint.trainable_state(applied)
    t_opt, meta = checkpoint.optimizer_state_to_tensors(opt)
    assert not set(t_params) & set(t_opt)
    checkpoint.save_state(tmp_path / "ckpt", {**t_params, **t_opt}, {"step": 2, **meta})
    assert any(k.startswith("text_encoder.") and "new_rows" in k for k in t_params)

    c2, applied2 = fresh()
    opt2 = torch.optim.AdamW([dict(g, lr=3e-2) for g in applied2.param_groups], weight_decay=1e-2)
    tensors, meta2 = checkpoint.load_state(tmp_path / "ckpt")
    checkpoint.load_trainable_state(applied2, {k: v for k, v in tensors.items() if not k.startswith("optim.")})
    checkpoint.optimizer_state_from_tensors(opt2, tensors, meta2)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]  # betas stay tuples, names, lrs, ...
    for i, st in sd1["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sd2["state"][i][k]), (i, k)

    # One more identical step from both gives bit-identical parameters.
    for cc, aa, oo in ((c, applied, opt), (c2, applied2, opt2)):
        for m in cc.modules().values():
            m.train()
        emb, _ = models.encode_text(cc, [PROMPT], "cpu")
        out = cc.unet(torch.ones(1, 4, 8, 8), torch.tensor([10]), emb).sample
        out.square().mean().backward()
        oo.step()
    for name, p in applied.named_params.items():
        assert torch.equal(p, applied2.named_params[name]), name


def test_trainable_state_refuses_another_strategy():
    c = models.build_tiny("sd")
    applied = strategies.apply(c, strategy("strategy.unet.mode=lora"), default_lr=1e-3)
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.load_trainable_state(applied, {"unet.nope": torch.zeros(1)})


def test_full_text_encoder_with_token_saves_a_config_that_pools_at_eos(base_dirs, tmp_path):
    """Loaded with plain transformers, a fully tuned SDXL encoder that owns <SAR> pools at
    <|endoftext|> (its saved config carries the real eos id, not the hub's 2)."""
    from transformers import CLIPTextModelWithProjection

    s = strategy("strategy.text_encoder.mode=full", "strategy.token=learn")
    c = models.load_components(load(None, [f"model.pretrained={base_dirs['sdxl']}"]).model, keep_fp32={"text_encoder_2"})
    applied = strategies.apply(c, s, default_lr=1e-3)
    train(c, applied)
    out = tmp_path / "out"
    checkpoint.save_outputs(c, applied, s, out)
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    tok2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
    assert te2.config.eos_token_id == 49407 and tok2.convert_tokens_to_ids("<SAR>") == 49408
    ids = tok2(["<SAR> image of open water", "<SAR> image of a dense forest"], padding="max_length",
               max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = te2(ids).text_embeds
        live = c.text_encoders[1](ids).text_embeds
    assert (pooled[0] - pooled[1]).abs().max() > 1e-4
    torch.testing.assert_close(pooled, live, rtol=1e-5, atol=1e-5)  # the plain folder is the trained encoder
    # the wrapper is back in place after saving: training may go on
    assert isinstance(c.text_encoders[1].get_input_embeddings(), strategies.LearnedTokenEmbedding)


def test_saving_refuses_a_trainable_mode_without_a_saver(monkeypatch, tmp_path):
    """A new mode that trains but cannot be saved must fail loudly, never be scored as the base."""
    s = strategy("strategy.unet.mode=lora")
    c = models.build_tiny("sd")
    applied = strategies.apply(c, s, default_lr=1e-3)
    applied.modes["unet"] = "mystery"
    monkeypatch.setitem(strategies.MODES, "mystery", strategies.Mode(strategies.MODES["lora"].apply, save=None, load=None))
    with pytest.raises(ValueError, match="'mystery' of unet trains but has no saver"):
        checkpoint.save_outputs(c, applied, s, tmp_path / "out")
