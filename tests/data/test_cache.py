"""The shared latent cache (data.cache): its key, what a trial reads, what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sar_ray import config
from sar_ray.data import cache
from sar_ray.models import build_tiny
from sar_ray.trial import read_log, run_trial

PROMPTS = '["<SAR> image of open water with a ship"]'
BASE = [
    "model.pretrained=tiny-sdxl",
    "data.synthetic.n=12", "data.synthetic.size=32", "data.resolution=32", "data.val_fraction=0.2",
    "train.max_steps=3", "train.batch_size=2", "train.eval_every=3", "train.checkpoint_every=3",
    "train.eval_batches=1", f"sample.prompts={PROMPTS}", "sample.seeds=[0]", "sample.steps=1",
]


def _cfg(tmp_path: Path, *sets: str, out: str = "out"):
    return config.load(None, [*BASE, f"out={tmp_path / out}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                              "tracking.experiment=test", *sets]).trial()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)  # the synthetic data and the latent cache land here
    return tmp_path


def _key(cfg, vae=None) -> str:
    return cache.cache_key(cache.key_inputs(cfg, vae or build_tiny("sdxl").vae))


def test_key_misses_on_any_change_of_what_the_latents_depend_on(tmp_path, monkeypatch):
    base = _cfg(tmp_path)
    vae = build_tiny("sdxl").vae
    k = _key(base, vae)
    assert _key(base, build_tiny("sdxl").vae) == k  # the same weights: the same key, in any process
    changed = {
        "resolution": _cfg(tmp_path, "data.resolution=16"),
        "normalization": _cfg(tmp_path, "data.normalization.k=2.0"),
        "flip": _cfg(tmp_path, "data.flip=true"),
        "crop": _cfg(tmp_path, "data.crop=random"),
        "dtype": _cfg(tmp_path, "model.weight_dtype=bf16", "model.vae_force_upcast=false",
                      "train.mixed_precision=bf16"),
        "data": _cfg(tmp_path, "data.synthetic.n=13"),
        # The rows hold the captions too: several caption columns store every candidate.
        "captions": _cfg(tmp_path, "data.text_column=[text, label]"),
    }
    for what, cfg in changed.items():
        assert _key(cfg, vae) != k, what
    # Pixels rounded to other steps feed the encoder other values (a cache of float32 pixels,
    # version 1, is a miss too; so is one of version 2, whose rows lack the candidate captions).
    assert cache.key_inputs(base, vae)["pixels"] == "uint16"
    monkeypatch.setattr(cache, "CACHE_VERSION", 2)
    assert _key(base, vae) != k
    monkeypatch.undo()
    monkeypatch.setattr(cache, "PIXEL_DTYPE", np.uint8)
    assert _key(base, vae) != k
    monkeypatch.undo()
    other = build_tiny("sdxl", seed=1).vae  # another model's encoder weights
    assert _key(base, other) != k
    import torch

    with torch.no_grad():
        vae.quant_conv.weight[0, 0, 0, 0] += 1e-3  # one weight of quant_conv
    assert _key(base, vae) != k
    # What the encoder never sees does not miss: the strategy, the learning rate, the decoder.
    assert _key(_cfg(tmp_path, "strategy.unet.mode=lora", "train.lr=1e-3"), build_tiny("sdxl").vae) == k


def _calls(out: Path) -> int:
    return next(r["vae_encoder_calls"] for r in read_log(out / "train_log.jsonl") if r.get("event") == "end")


def _text_calls(out: Path) -> int:
    return next(r["text_encoder_calls"] for r in read_log(out / "train_log.jsonl") if r.get("event") == "end")


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "train_log.jsonl") if "loss" in r]


def _val_losses(out: Path) -> list[float]:
    return [r["val_loss"] for r in read_log(out / "train_log.jsonl") if "val_loss" in r]


@pytest.mark.slow  # four trials (off, auto, vae, te): ~80 s on 2 cores
def test_cached_trial_trains_like_the_uncached_one_with_zero_encoder_calls(in_tmp):
    """Same seed, flip on: the cached trial draws the same latents (the flipped image's posterior
    where the pixels would flip), so its losses equal the uncached trial's; it calls the encoder
    never, the uncached one every step; a VAE-tuning trial ignores the latent cache. The text half:
    the frozen text encoders are never called by the cached trials' steps (the VAE-tuning one
    included), by the uncached one's every step, and a trial with a text-encoder LoRA ignores it."""
    sets = ["strategy.unet.mode=lora", "data.flip=true", "train.eval_every=1"]
    plain = run_trial(_cfg(in_tmp, *sets, "data.cache=off", out="off"), progress=False)
    cached = run_trial(_cfg(in_tmp, *sets, "data.cache=auto", out="auto"), progress=False)
    vae = run_trial(_cfg(in_tmp, *sets, "data.cache=auto", "strategy.vae.mode=lora", out="vae"), progress=False)
    te = run_trial(_cfg(in_tmp, *sets, "data.cache=auto", "strategy.text_encoder.mode=lora", out="te"),
                   progress=False)
    assert _calls(cached.out) == 0
    assert _calls(plain.out) >= 3  # one per step (+ validation)
    assert _calls(vae.out) >= 3
    assert _calls(te.out) == 0  # its VAE is frozen: latents cached, text encoded every step
    assert _text_calls(cached.out) == 0 and _text_calls(vae.out) == 0
    assert _text_calls(plain.out) >= 2 * 3 and _text_calls(te.out) >= 2 * 3  # SDXL: 2 encoders a step
    # Step 1 sees the same weights: equal up to float noise (the cache encoded 16 images a call,
    # the step 2). Later steps amplify that noise through Adam's first, sign-like updates (a
    # LoRA weight whose gradient is ~0 moves by +-lr on either side of it): close.
    assert _losses(cached.out)[0] == pytest.approx(_losses(plain.out)[0], rel=1e-5)
    np.testing.assert_allclose(_losses(cached.out), _losses(plain.out), rtol=5e-3)
    # Validation reads the same held-out latents: equal after the first update. Not compared at
    # the last step: on 2 held-out images with fixed noise the loss swings ~1% a step, and the
    # amplified noise above moved it 0.700 vs 0.684 at step 3 (0.6942 vs 0.6942 at step 5).
    first = [_val_losses(r.out)[0] for r in (plain, cached)]
    assert first[1] == pytest.approx(first[0], rel=1e-4)
    assert len(_val_losses(cached.out)) == 3 and np.isfinite(cached.val_loss)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    runs = {Path(r.data.tags["sar_ray.out"]).name: r for r in
            client.search_runs([client.get_experiment_by_name("test").experiment_id])}
    assert runs["auto"].data.tags["data.cache_used"] == "true"
    assert runs["auto"].data.tags["data.cache_key"] == _key(_cfg(in_tmp, *sets))
    assert runs["vae"].data.tags["data.cache_used"] == "false"
    assert runs["off"].data.tags["data.cache_used"] == "false"
    assert runs["auto"].data.metrics["data/vae_encoder_calls"] == 0
    assert runs["off"].data.metrics["data/vae_encoder_calls"] >= 3
    text_key = cache.cache_key(cache.text_key_inputs(_cfg(in_tmp, *sets), cache.load_text(_cfg(in_tmp).model)))
    for name, used in (("auto", "true"), ("vae", "true"), ("off", "false"), ("te", "false")):
        assert runs[name].data.tags["data.text_cache_used"] == used, name
        assert runs[name].data.tags.get("data.text_cache_key") == (text_key if used == "true" else None), name
        calls = runs[name].data.metrics["data/text_encoder_calls"]
        assert (calls == 0) if used == "true" else (calls >= 6), (name, calls)
    assert runs["te"].data.tags["data.cache_used"] == "true"


def _study_file(tmp_path: Path, *sets: str) -> Path:
    doc: dict = {"name": "cachetest"}
    for kv in [*BASE, *sets]:
        k, v = kv.split("=", 1)
        node = doc
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(v)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _folders(root: Path, half: str = cache.LOCAL_ROOT) -> list[Path]:
    return sorted(p for p in (root / half).iterdir() if p.is_dir())


def _said(out: str, half: str) -> str:
    """The line `sar-ray data cache` printed for one cache half ("latent" or "text")."""
    return next(line for line in out.splitlines() if line.startswith(f"{half} cache"))


@pytest.mark.slow  # three CLI runs (cache, trial, rebuilt cache): ~110 s on 2 cores
def test_data_cache_then_trial_reuses_it_and_a_corrupt_or_foreign_cache_is_rebuilt(in_tmp, capsys):
    from sar_ray.cli import main

    study = _study_file(in_tmp, "data.cache=auto", "tracking.enabled=false", f"out={in_tmp / 't'}")
    assert main(["data", "cache", str(study)]) == 0
    said = capsys.readouterr().out
    assert "built" in _said(said, "latent") and "built" in _said(said, "text")
    (folder,) = _folders(in_tmp)
    (text_folder,) = _folders(in_tmp, cache.TEXT_LOCAL_ROOT)
    text_stamp = (text_folder / cache.MARKER).stat().st_mtime_ns
    marker = json.loads((folder / cache.MARKER).read_text())
    assert marker["key"] == folder.name and marker["n_train"] > 0
    stamp = (folder / cache.MARKER).stat().st_mtime_ns
    assert main(["trial", str(study), "-q"]) == 0
    assert _folders(in_tmp) == [folder] and (folder / cache.MARKER).stat().st_mtime_ns == stamp  # no rebuild
    assert _calls(in_tmp / "t") == 0
    assert _folders(in_tmp, cache.TEXT_LOCAL_ROOT) == [text_folder]
    assert (text_folder / cache.MARKER).stat().st_mtime_ns == text_stamp and _text_calls(in_tmp / "t") == 0

    # A truncated shard: a miss, rebuilt (never read as a shorter or garbled set).
    shard = sorted((folder / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    text_shard = sorted(text_folder.glob("*.parquet"))[0]
    text_shard.write_bytes(text_shard.read_bytes()[:100])
    assert main(["data", "cache", str(study)]) == 0
    said = capsys.readouterr().out
    assert "built" in _said(said, "latent") and "reused" not in _said(said, "latent")
    assert "built" in _said(said, "text") and "reused" not in _said(said, "text")
    assert json.loads((folder / cache.MARKER).read_text())["n_train"] == marker["n_train"]
    assert main(["data", "cache", str(study)]) == 0
    said = capsys.readouterr().out
    assert "reused" in _said(said, "latent") and "reused" in _said(said, "text")

    # Another model's cache put in this key's place (its marker names another key): refused, rebuilt.
    (folder / cache.MARKER).write_text(json.dumps({**marker, "key": "0" * 24}))
    assert main(["data", "cache", str(study)]) == 0
    assert "reused" not in _said(capsys.readouterr().out, "latent")
    assert json.loads((folder / cache.MARKER).read_text())["key"] == folder.name


def test_a_sweep_builds_only_the_cache_halves_some_point_of_its_search_reads(in_tmp):
    """Before, a sweep encoded every image and caption ahead even when no trial of its grid could
    read them (every VAE tuned; a text LoRA or the learned token in every point)."""
    from sar_ray.data import build_datasets
    from sar_ray.sweep import search_configs

    def shared(*sets):
        study = config.load(None, [*BASE, "data.cache=auto", f"out={in_tmp / 'o'}", *sets])
        base, points = study.trial(), search_configs(study)
        return points, prebuild(base, build_datasets(base.data, base.train.seed), points)

    prebuild = cache.prebuild
    # Every point tunes the VAE, and tunes a text encoder or learns the token: nothing to build.
    _, data = shared('search.space={"strategy.vae": {"grid": [{"mode": "full"}, {"mode": "lora", "rank": 2}]}, '
                        '"strategy.token": {"grid": ["learn"]}}', "strategy.text_encoder.mode=lora")
    assert not isinstance(data, cache.CachedTrainData) and not (in_tmp / cache.LOCAL_ROOT).exists()
    assert not (in_tmp / cache.TEXT_LOCAL_ROOT).exists()
    # VAE tuned everywhere, one point with the text side frozen: the text half alone.
    points, data = shared('search.space={"strategy.vae": {"grid": [{"mode": "full"}]}, '
                        '"strategy.token": {"grid": ["none", "learn"]}}')
    assert data.cached is None and data.text_table is not None and not (in_tmp / cache.LOCAL_ROOT).exists()
    (text_folder,) = _folders(in_tmp, cache.TEXT_LOCAL_ROOT)
    (frozen,) = [p for p in points if p.strategy.token == "none"]
    out, tags = cache.for_trial(frozen, data, {})
    assert out.text_embeds is data.text_table and tags["data.text_cache_key"] == text_folder.name
    assert tags["data.cache_used"] == "false"
    # One point with a frozen VAE: the latents too.
    _, data = shared('search.space={"strategy.vae": {"grid": [{"mode": "frozen"}, {"mode": "full"}]}}')
    assert data.cached is not None and len(_folders(in_tmp)) == 1


def test_data_cache_says_which_half_no_trial_of_the_search_reads(in_tmp, capsys):
    from sar_ray.cli import main

    study = _study_file(in_tmp, "data.cache=auto", "tracking.enabled=false", "strategy.text_encoder.mode=lora",
                        'search.space={"strategy.token": {"grid": ["learn"]}, '
                        '"strategy.vae": {"grid": [{"mode": "frozen"}, {"mode": "full"}]}}')
    assert main(["data", "cache", str(study)]) == 0
    said = capsys.readouterr().out
    assert "built" in _said(said, "latent") and len(_folders(in_tmp)) == 1
    assert "not built (every trial of the search tunes a text encoder or learns the token)" in _said(said, "text")
    assert not (in_tmp / cache.TEXT_LOCAL_ROOT).exists()


def test_a_streamed_image_that_decodes_badly_after_the_scan_leaves_a_cache_that_stays_valid(in_tmp):
    """With data.on_corrupt=skip, an image whose header reads but whose pixels do not (a PNG cut
    inside its image data) passes the streamed scan and is dropped in preparation. The cache
    then held one row fewer than its marker's count, so it was never valid again: every trial
    encoded the whole set anew. Now the marker counts the rows written, and a trial reading the
    cache trains on exactly that many, as it says."""
    from shards import sample, write_shard

    from sar_ray.data import build_datasets

    samples = {f"{i:04d}": sample(f"{i:04d}", (32, 32)) for i in range(6)}
    png = samples["0003"]["sar.png"]
    samples["0003"]["sar.png"] = png[:png.index(b"IDAT") + 20]  # header intact, image data cut
    write_shard(in_tmp / "wds" / "shard-000000.tar", samples)
    cfg = _cfg(in_tmp, f"data.path={in_tmp / 'wds'}", "data.image_column=sar.png", "data.text_column=caption.MID",
               "data.on_corrupt=skip", "data.cache=auto", "data.val_fraction=0.0", "data.materialize=never")
    data = build_datasets(cfg.data, seed=0)
    assert data.n_train == 6 and not data.counts_exact  # the scan reads headers: the cut image looks fine there
    held = build_datasets(cfg.data.model_copy(update={"materialize": "always"}), seed=0)
    assert (held.n_train, held.n_skipped, held.counts_exact) == (5, 1, True)  # prepared rows: counted
    key, marker, built = cache.build(cfg, data)
    assert built and marker["n_train"] == 5
    again = build_datasets(cfg.data, seed=0)
    assert cache.build(cfg, again)[2] is False  # valid: reused, not encoded again
    read = cache.open_latents(cfg, again, key, marker)
    assert read.n_train == read.train.count() == 5 and read.n_skipped == 1 and read.counts_exact


def test_a_cache_whose_rows_do_not_read_back_is_an_error_not_an_empty_split(in_tmp, monkeypatch):
    """A Parquet footer that did not read back (a storage error) counted as 0 rows: the val half
    was recorded as empty, the cache stayed valid so, and every trial trained without validation."""
    from sar_ray.data import build_datasets

    cfg = _cfg(in_tmp, "data.cache=auto")
    data = build_datasets(cfg.data, seed=0)
    assert data.val is not None
    real = cache._rows
    monkeypatch.setattr(cache, "_rows", lambda fs, folder, *a: None if ".tmp-" in folder and folder.endswith("/val")
                        else real(fs, folder, *a))
    with pytest.raises(cache.CacheError, match="do not read back"):
        cache.build(cfg, data)
    assert list((in_tmp / cache.LOCAL_ROOT).iterdir()) == []  # nothing half-written left to read
    monkeypatch.setattr(cache, "_rows", real)  # (not undo(): that would leave in_tmp's chdir too)
    key, marker, built = cache.build(cfg, data)
    assert built and (marker["n_train"], marker["n_val"]) == (data.n_train, data.n_val)
