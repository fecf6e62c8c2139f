"""strategies.py: after a few AdamW steps on a diffusion loss, exactly the parameters a
strategy names have moved: frozen weights and LoRA base weights are bit-identical, and a learned
token moves its own embedding row only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from sar_ray import models, strategies
from sar_ray.config import ConfigError, load
from sar_ray.strategies import STRATEGIES, LearnedTokenEmbedding, apply

CAPTIONS = ["<SAR> image of open water with a ship", "<SAR> image of a forest"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def strategy(**modes: str):
    """A StrategyConfig from short keys: unet=, te=, te2=, vae= (modes), token=, plus extra overrides."""
    keys = {"unet": "strategy.unet.mode", "te": "strategy.text_encoder.mode", "te2": "strategy.text_encoder_2.mode",
            "vae": "strategy.vae.mode", "token": "strategy.token"}
    sets = ["strategy.unet.mode=frozen"]
    extra = modes.pop("extra", [])
    sets += [f"{keys[k]}={v}" for k, v in modes.items()]
    return load(None, sets + extra).strategy


def diffusion_loss(c: models.Components, applied: strategies.Applied, seed: int = 0) -> torch.Tensor:
    """Noise-prediction MSE through the UNet with encode_text conditioning; plus a VAE
    reconstruction loss when the VAE trains (what train.py optimises, in miniature)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    posterior = c.vae.encode(images).latent_dist
    latents = posterior.mean.detach() * c.vae.config.scaling_factor  # (2, 4, 8, 8)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    noisy = c.noise_scheduler.add_noise(latents, noise, t)
    emb, pooled = models.encode_text(c, CAPTIONS, "cpu")
    kw = {}
    if c.kind == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    pred = c.unet(noisy, t, emb, **kw).sample
    loss = F.mse_loss(pred, noise)
    if applied.modes["vae"] != "frozen":
        recon = c.vae.decode(posterior.sample(generator=g)).sample
        loss = loss + F.mse_loss(recon, images)
    return loss


def train(c, applied, steps: int = 3, lr_scale: float = 1.0, weight_decay: float = 0.1) -> None:
    for m in c.modules().values():
        m.train()
    groups = [dict(g, lr=g["lr"] * lr_scale) for g in applied.param_groups]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    for step in range(steps):
        diffusion_loss(c, applied, seed=step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def snapshot(c) -> dict[str, torch.Tensor]:
    return {f"{comp}.{n}": p.detach().clone() for comp, m in c.modules().items() for n, p in m.named_parameters()}


def embedding_matrices(c) -> list[torch.Tensor]:
    return [te.get_input_embeddings().weight.detach().clone() for te in c.text_encoders]


def run(kind: str, s, steps: int = 3):
    c = models.build_tiny(kind)
    applied = apply(c, s, default_lr=1e-3)
    before, emb_before = snapshot(c), embedding_matrices(c)
    train(c, applied, steps)
    return c, applied, before, snapshot(c), emb_before, embedding_matrices(c)


def assert_exactly_trainables_changed(applied, before, after) -> None:
    assert before.keys() == after.keys()
    trainable = set(applied.named_params)
    assert trainable, "nothing trained"
    for name in before:
        same = torch.equal(before[name], after[name])
        if name in trainable:
            assert not same, f"{name} is trainable but did not change"
        else:
            assert same, f"{name} is not trainable but changed"
    for name, p in applied.named_params.items():
        assert p.dtype == torch.float32 and p.requires_grad, name


def assert_modes(c, applied) -> None:
    """Each component's trainable parameters are what its mode says."""
    names = list(applied.named_params)
    for comp, mode in applied.modes.items():
        mine = [n for n in names if n.startswith(comp + ".") and "new_rows" not in n]
        if mode == "frozen":
            assert not mine, comp
        elif mode == "lora":
            assert mine and all(".lora_A." in n or ".lora_B." in n for n in mine), comp
            if comp == "vae":  # decoder only: the encoder (and so the UNet's latents) stays the base's
                assert all(n.startswith("vae.decoder.") for n in mine), mine
        else:
            module = c.modules()[comp]
            n_all = sum(1 for n, _ in module.named_parameters() if "new_rows" not in n)
            unused = 0
            if c.kind == "sdxl" and comp == "text_encoder":
                unused = len(strategies._sdxl_unused_parameters(c.text_encoders[0]))
            if comp == "vae":
                unused = sum(1 for n, _ in module.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
                assert unused > 0 and not any(n.startswith(("vae.encoder.", "vae.quant_conv.")) for n in mine)
            assert len(mine) == n_all - unused, comp


# -- every mode of every component ---------------------------------------------------------------

ONE_COMPONENT = [
    (kind, comp, mode)
    for kind, comps in (("sd", ["unet", "te", "vae"]), ("sdxl", ["unet", "te", "te2", "vae"]))
    for comp in comps
    for mode in ("full", "lora")
]


@pytest.mark.parametrize("kind,comp,mode", ONE_COMPONENT, ids=[f"{k}-{c}-{m}" for k, c, m in ONE_COMPONENT])
def test_one_component_trains_the_rest_stays_frozen(kind, comp, mode):
    extra = {"te2": "frozen"} if kind == "sdxl" and comp == "te" else {}
    if comp == "te2":
        extra = {"te": "frozen"}
    s = strategy(**{comp: mode}, **extra)
    c, applied, before, after, *_ = run(kind, s)
    assert applied.token_ids is None
    assert_modes(c, applied)
    assert_exactly_trainables_changed(applied, before, after)  # frozen components: bit-identical
    if mode == "lora":
        module = c.modules()[{"te": "text_encoder", "te2": "text_encoder_2"}.get(comp, comp)]
        assert any(isinstance(m, LoraLayer) for m in module.modules())


TOKEN_CASES = [
    ("sd", {"te": "frozen"}),
    ("sd", {"te": "lora", "unet": "lora"}),
    ("sd", {"te": "full"}),
    ("sdxl", {"te": "frozen"}),
    ("sdxl", {"te": "lora", "te2": "frozen"}),
    ("sdxl", {"te": "full", "te2": "lora", "vae": "lora"}),
]


@pytest.mark.parametrize("kind,modes", TOKEN_CASES, ids=[f"{k}-" + "-".join(f"{a}{b}" for a, b in m.items()) for k, m in TOKEN_CASES])
def test_learned_token_moves_only_its_row(kind, modes):
    s = strategy(token="learn", **modes)
    c, applied, before, after, emb_before, emb_after = run(kind, s)
    assert_modes(c, applied)
    assert_exactly_trainables_changed(applied, before, after)
    te_names = c.text_encoder_names
    for name, tok, tid, e0, e1 in zip(te_names, c.tokenizers, applied.token_ids, emb_before, emb_after):
        assert tok.convert_tokens_to_ids("<SAR>") == tid == 49408
        assert tok("<SAR> radar").input_ids == [49406, tid, 9672, 49407]
        assert not torch.equal(e0[tid], e1[tid]), f"{name}: token row did not move"
        if applied.modes[name] != "full":
            assert isinstance(c.modules()[name].get_input_embeddings(), LearnedTokenEmbedding)
            # every other row bit-identical, under AdamW weight decay 0.1 and TE LoRA alike
            assert torch.equal(e0[:tid], e1[:tid]), f"{name}: other rows moved"


def test_token_row_starts_from_init_word():
    c = models.build_tiny("sdxl")
    reference = embedding_matrices(c)
    applied = apply(c, strategy(token="learn"), default_lr=1e-3)
    init = c.tokenizers[0].encode("radar", add_special_tokens=False)[0]
    for e_ref, e_new, tid in zip(reference, embedding_matrices(c), applied.token_ids):
        assert torch.equal(e_new[tid], e_ref[init])
        assert torch.equal(e_new[:tid], e_ref)
    assert [g["name"] for g in applied.param_groups] == ["token"]
    assert applied.num_trainable() == 2 * 32


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_reference_winner_unet_full_te_lora_token(kind):
    s = strategy(unet="full", te="lora", token="learn")
    c, applied, before, after, emb_before, emb_after = run(kind, s)
    expected = {"unet": "full", "text_encoder": "lora", "vae": "frozen"}
    if kind == "sdxl":
        expected["text_encoder_2"] = "lora"
    assert applied.modes == expected
    assert_modes(c, applied)
    assert_exactly_trainables_changed(applied, before, after)
    for tid, e0, e1 in zip(applied.token_ids, emb_before, emb_after):
        assert torch.equal(e0[:tid], e1[:tid]) and not torch.equal(e0[tid], e1[tid])
    assert {g["name"] for g in applied.param_groups} == {"unet", "token", *c.text_encoder_names}


def test_text_encoder_lora_works_with_installed_transformers_and_peft():
    """Regression guard: transformers 5.24 refuses text-encoder adapters unless peft >= 0.22.
    Fails if CLIP text-encoder LoRA stops being injected, trainable or effective."""
    c = models.build_tiny("sd")
    te = c.text_encoders[0]
    applied = apply(c, strategy(te="lora", extra=["strategy.text_encoder.rank=2"]), default_lr=1e-2)
    layers = {n: m for n, m in te.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 2 * 4  # q, k, v, out projections of both layers
    assert all(m.r["default"] == 2 for m in layers.values())
    assert applied.num_trainable() == sum(p.numel() for n, p in te.named_parameters() if "lora_" in n) > 0
    ids = models.tokenize(c, CAPTIONS)
    with torch.no_grad():
        out_before = models.encode_ids(c, ids, "cpu")[0]
    train(c, applied, steps=3)
    te.eval()
    with torch.no_grad():
        out_after = models.encode_ids(c, ids, "cpu")[0]
        te.disable_adapters()
        out_base = models.encode_ids(c, ids, "cpu")[0]
        te.enable_adapters()
    assert not torch.allclose(out_before, out_after), "LoRA did not change the text encoder"
    assert torch.equal(out_before, out_base), "base weights moved under LoRA"


# -- learning rates, dtypes -----------------------------------------------------------------------


def test_learning_rates_per_component_and_token():
    s = strategy(unet="lora", te="full", token="learn", extra=["strategy.unet.lr=3e-4", "strategy.token_lr=5e-3"])
    applied = apply(models.build_tiny("sdxl"), s, default_lr=1e-4)
    lrs = {g["name"]: g["lr"] for g in applied.param_groups}
    # token_lr holds in every text-encoder mode, full included: the new rows have their own group
    assert lrs == {"unet": 3e-4, "text_encoder": 1e-4, "text_encoder_2": 1e-4, "token": 5e-3}
    assert applied.token_ids == [49408, 49408]


@pytest.mark.parametrize("te_mode", ["full", "lora", "frozen"])
def test_token_row_moves_at_token_lr_in_every_text_encoder_mode(te_mode):
    """Adam's first step moves every element by about lr: the token row moves by token_lr,
    not by the encoder's rate (before the fix a full encoder trained it at its own rate)."""
    s = strategy(unet="frozen", te=te_mode, token="learn", extra=["strategy.text_encoder.lr=1e-5", "strategy.token_lr=1e-2"])
    c = models.build_tiny("sd")
    applied = apply(c, s, default_lr=1e-5)
    row_before = embedding_matrices(c)[0][applied.token_ids[0]]
    train(c, applied, steps=1, weight_decay=0.0)
    step = (embedding_matrices(c)[0][applied.token_ids[0]] - row_before).abs().max().item()
    assert 0.5e-2 < step < 1.5e-2, step


def test_low_precision_frozen_parts_fp32_trainables():
    model_cfg = load(None, ["model.pretrained=tiny-sd", "model.weight_dtype=bf16", "train.mixed_precision=bf16"]).model
    s = strategy(unet="lora", te="full", token="learn")
    c = models.load_components(model_cfg, keep_fp32=strategies.full_components(s))
    assert strategies.full_components(s) == {"text_encoder", "text_encoder_2"}
    assert c.text_encoders[0].dtype == torch.float32 and c.unet.dtype == torch.bfloat16
    applied = apply(c, s, default_lr=1e-3)
    assert all(p.dtype == torch.float32 for p in applied.trainable_parameters())
    frozen = [p for p in c.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    before = snapshot(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train(c, applied, steps=2)
    assert_exactly_trainables_changed(applied, before, snapshot(c))


def test_token_wrapper_with_low_precision_base():
    c = models.load_components(load(None, ["model.weight_dtype=bf16", "train.mixed_precision=bf16", "model.pretrained=tiny-sd"]).model)
    apply(c, strategy(token="learn"), default_lr=1e-2)
    wrapper = c.text_encoders[0].get_input_embeddings()
    assert wrapper.base.weight.dtype == torch.bfloat16 and wrapper.new_rows.dtype == torch.float32
    emb, _ = models.encode_text(c, CAPTIONS, "cpu")
    emb.float().square().mean().backward()
    assert wrapper.new_rows.grad is not None and wrapper.new_rows.grad.abs().sum() > 0


def test_materialize_token_gives_plain_embedding_with_learned_row():
    c = models.build_tiny("sd")
    applied = apply(c, strategy(token="learn"), default_lr=1e-2)
    train(c, applied, steps=2)
    learned = strategies.learned_token_vectors(c, applied)["text_encoder"]
    with torch.no_grad():
        emb_wrapped = models.encode_text(c, CAPTIONS, "cpu")[0]
    strategies.materialize_token(c)
    plain = c.text_encoders[0].get_input_embeddings()
    assert type(plain) is torch.nn.Embedding and torch.equal(plain.weight[49408], learned)
    with torch.no_grad():
        assert torch.equal(models.encode_text(c, CAPTIONS, "cpu")[0], emb_wrapped)


# -- refused settings ------------------------------------------------------------------------------


def test_strategies_dict_dispatch():
    assert set(STRATEGIES) == {"frozen", "full", "lora"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy.unet.rank=0"], "strategy.unet.rank: must be > 0"),
        (["strategy.unet.mode=frozen"], "nothing would train"),
        (["strategy.vae.mode=half"], "strategy.vae.mode"),
        (["strategy.text_encoder.lr=0"], "strategy.text_encoder.lr: must be > 0"),
    ],
)
def test_invalid_settings_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(None, overrides)


def test_lora_target_that_matches_nothing_is_refused():
    s = strategy(unet="lora", extra=["strategy.unet.target_modules=[no_such_layer]"])
    with pytest.raises(ValueError, match="strategy.unet.target_modules"):
        apply(models.build_tiny("sd"), s, default_lr=1e-3)


def test_token_already_in_vocabulary_is_refused():
    # A vocabulary entry: diffusers' load_textual_inversion could not load it back.
    s = strategy(token="learn", extra=["strategy.token_string=<|endoftext|>", "data.caption_prefix=<|endoftext|>",
                                       "sample.prompts=[<|endoftext|> radar]"])
    with pytest.raises(ValueError, match="already in tokenizer's vocabulary"):
        apply(models.build_tiny("sd"), s, default_lr=1e-3)
