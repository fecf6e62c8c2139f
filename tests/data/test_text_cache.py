"""The text half of data.cache: frozen text encoders' outputs per caption, looked up instead of
computed. Exactly equal training (fp32), its key, and when a trial may read it."""

from __future__ import annotations

import pytest
import torch

from sar_ray import config
from sar_ray.config import ModelConfig, TrainConfig
from sar_ray.data import cache
from sar_ray.data.dataset import epoch_caption
from sar_ray.diffusion import Batch, compute_loss
from sar_ray.models import encode_text, load_components

# Several caption columns: every candidate, prefixed as the dataset writes them.
CANDIDATES = [["<SAR> open water", "<SAR> open water with a ship near the coast", "<SAR> sea"],
              ["<SAR> urban area", "<SAR> dense buildings"], ["<SAR> farmland fields"],
              ["<SAR> forest", "<SAR> a mountain forest with a road"]]


def _table(c, captions):
    return cache.text_table(c, captions, "no", torch.device("cpu"))


def _train(model: str, text_cache, steps: int = 4):
    """A few UNet steps with caption dropout and per-epoch captions; (losses, final UNet weights, text calls)."""
    torch.manual_seed(0)
    c = load_components(ModelConfig(pretrained=model))
    c.unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(c.unet.parameters(), lr=1e-3)
    calls = cache.TextEncoderCalls(c.text_encoders)
    tcfg = TrainConfig(min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        # epoch = step: each step another choice among the candidates
        captions = [epoch_caption(t, k, step, 7) for k, t in enumerate(CANDIDATES)]
        batch = Batch(torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, captions, text_cache=text_cache)
        batch.drop = torch.rand(4, generator=g) < 0.5
        if step == 0:
            batch.drop = torch.tensor([True, False, True, False])  # at least one dropped caption
        out = compute_loss(c, batch, tcfg, g, tune_vae=False, resolution=32)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return losses, {k: v.detach().clone() for k, v in c.unet.state_dict().items()}, calls.n


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15", "tiny-sd2"])
def test_cached_text_trains_exactly_like_the_encoders(model):
    """fp32: the same losses and UNet weights bit for bit, dropped captions included (SDXL: the
    caption's embedding zeroed; SD: the embedding of ""), with no text encoder call."""
    c = load_components(ModelConfig(pretrained=model))
    captions = sorted({"", *(t for ts in CANDIDATES for t in ts)})
    table = _table(c, captions)
    assert (table["pooled_hidden"] is not None) == (model == "tiny-sdxl")
    plain_losses, plain_w, plain_calls = _train(model, None)
    cached_losses, cached_w, cached_calls = _train(model, cache.TextEmbeddings(table, torch.device("cpu")))
    assert plain_calls == 4 * len(c.text_encoders) and cached_calls == 0
    for a, b in zip(plain_losses, cached_losses):
        assert torch.equal(a, b), (a, b)
    for k in plain_w:
        assert torch.equal(plain_w[k], cached_w[k]), k


def test_a_caption_not_in_the_cache_is_an_error():
    c = load_components(ModelConfig(pretrained="tiny-sd15"))
    emb = cache.TextEmbeddings(_table(c, ["", "<SAR> sea"]), torch.device("cpu"))
    with pytest.raises(KeyError, match="no embedding"):
        emb.lookup(["<SAR> land"])


def _cfg(tmp_path, *sets):
    return config.load(None, ["model.pretrained=tiny-sdxl", "data.cache=auto", f"out={tmp_path}/o", *sets]).trial()


def test_text_wanted_only_for_a_frozen_text_side(tmp_path):
    assert cache.text_wanted(_cfg(tmp_path))
    assert cache.text_wanted(_cfg(tmp_path, "strategy.vae.mode=lora"))  # the VAE does not touch the text side
    assert cache.text_wanted(_cfg(tmp_path, "strategy.unet.mode=lora"))
    assert not cache.text_wanted(_cfg(tmp_path, "data.cache=off"))
    assert not cache.text_wanted(_cfg(tmp_path, "strategy.text_encoder.mode=lora"))
    assert not cache.text_wanted(_cfg(tmp_path, "strategy.text_encoder_2.mode=lora"))
    assert not cache.text_wanted(_cfg(tmp_path, "strategy.token=learn"))


def _key(cfg, c=None):
    return cache.cache_key(cache.text_key_inputs(cfg, c or cache.load_text(cfg.model)))


def test_text_key_misses_on_any_change_of_what_the_embeddings_depend_on(tmp_path):
    base = _cfg(tmp_path)
    k = _key(base)
    assert _key(base) == k  # the same weights: the same key
    changed = {
        "prefix": _cfg(tmp_path, "data.caption_prefix=null"),
        "dtype": _cfg(tmp_path, "model.weight_dtype=bf16", "model.vae_force_upcast=true", "train.mixed_precision=bf16"),
        "autocast": _cfg(tmp_path, "train.mixed_precision=bf16"),
        "columns": _cfg(tmp_path, "data.text_column=[text, label]"),
        "data": _cfg(tmp_path, "data.synthetic.n=13"),
        "model": _cfg(tmp_path, "model.pretrained=tiny-sd15"),
    }
    for what, cfg in changed.items():
        assert _key(cfg) != k, what
    c = cache.load_text(base.model)
    with torch.no_grad():
        c.text_encoders[1].text_model.final_layer_norm.weight[0] += 1e-3  # one weight of encoder 2
    assert _key(base, c) != k
    c = cache.load_text(base.model)
    c.text_encoders[0].config.eos_token_id = 2  # pooling at argmax(ids) again (no `pool_at_eos`)
    assert _key(base, c) != k
    c = cache.load_text(base.model)
    c.tokenizers[0].add_tokens("<SAR>")  # another tokenizer (an added token)
    assert _key(base, c) != k
    # What the text side never sees does not miss: the UNet's strategy, the learning rate, the seed.
    assert _key(_cfg(tmp_path, "strategy.unet.mode=lora", "train.lr=1e-3", "train.seed=3")) == k


def test_every_candidate_caption_is_cached(tmp_path, monkeypatch, ray_local):
    """Several caption columns: the cache holds each row's every candidate, validation's too, and ""."""
    monkeypatch.chdir(tmp_path)
    from sar_ray.data import build_datasets

    cfg = _cfg(tmp_path, "data.synthetic.n=12", "data.synthetic.size=32", "data.resolution=32",
               "data.val_fraction=0.25", "data.text_column=[text, label]")
    data = build_datasets(cfg.data, cfg.train.seed)
    key, marker, built = cache.build_text(cfg, data)
    assert built and not cache.build_text(cfg, data)[2]  # a second build reuses it
    table = cache.open_text(cfg, key)
    want = {""}
    for ds in (data.train, data.val):
        for row in ds.take_all():
            want.add(str(row["text"]))
            want.update(str(t) for t in row.get("texts", []))
    assert set(table["captions"]) == want and marker["n_captions"] == len(want)
    assert len(want) > 3 and all(t.startswith("<SAR>") for t in want - {""})
    c = place_text_cpu(cfg)
    emb = cache.TextEmbeddings(table, torch.device("cpu"))
    some = sorted(want)[:3]
    got, pooled = emb.lookup(some, c=c)
    with torch.no_grad():
        direct, direct_pooled = encode_text(c, some, "cpu")
    assert torch.equal(got, direct) and torch.equal(pooled, direct_pooled)


def place_text_cpu(cfg):
    return cache.place_text(cache.load_text(cfg.model), torch.device("cpu"))


def test_too_many_distinct_captions_for_a_table_run_the_encoders_and_say_why(tmp_path, monkeypatch, ray_local):
    """One caption per image (SARLO-80: ~360k captions, ~200 GiB of SDXL embeds) must not become a
    table every trial holds on its device: nothing is written, the trial's tags say why, and its
    steps run the frozen text encoders."""
    monkeypatch.chdir(tmp_path)
    from sar_ray.data import build_datasets

    cfg = _cfg(tmp_path, "data.synthetic.n=12", "data.synthetic.size=32", "data.resolution=32",
               "data.val_fraction=0.25")
    data = build_datasets(cfg.data, cfg.train.seed)
    c = cache.load_text(cfg.model)
    n = len(cache.captions_of(data))
    monkeypatch.setattr(cache, "TEXT_BUDGET", (n - 1) * cache.text_row_bytes(c))  # one caption too many
    key, marker, built = cache.build_text(cfg, data, c=c)
    assert not built and f"more than {n - 1} distinct captions" in marker["skipped"]
    # The count stops once over the budget: the captions past it are never read.
    assert cache.captions_of(data, limit=2) is None and cache.captions_of(data, limit=n) == cache.captions_of(data)
    fs, root = cache.cache_root(cfg, "text")
    assert not fs.get_file_info(f"{root}/{key}").type.name == "Directory"  # nothing written
    out, tags = cache.for_trial(cfg, data, {})
    assert out.text_embeds is None
    assert tags["data.text_cache_used"] == "false" and "frozen text encoders run" in tags["data.text_cache_skipped"]
    monkeypatch.setattr(cache, "TEXT_BUDGET", n * cache.text_row_bytes(c))  # exactly fits: built
    assert cache.build_text(cfg, data, c=c)[2]
