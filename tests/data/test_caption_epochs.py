"""Several caption columns (`data.text_column` a list, SARLO-80's SHORT / MID / LONG): training
samples one per image and epoch, the same for the same seed (a resume replays it), whether the
rows are streamed, in memory or cached latents; validation keeps one fixed caption per image."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sar_ray import config, train
from sar_ray.config import DataConfig
from sar_ray.data import build_datasets, stable_hash
from sar_ray.data.dataset import epoch_caption
from sar_ray.data.webdataset import pick_text
from sar_ray.train import EpochOrder
from sar_ray.trial import read_log, run_trial

from shards import meta, slc, write_sarlo

CAPTIONS = ["caption.SHORT", "caption.MID", "caption.LONG"]
EPOCHS = 4


def _candidates(key: str) -> list[str]:
    c = meta(key)["caption"]
    return [f"<SAR> {c['SHORT']}", f"<SAR> {c['MID']}", f"<SAR> {c['LONG']}"]


def _wds(root: Path) -> DataConfig:
    write_sarlo(root / "wds", n_shards=2, per_shard=4)  # keys 0000..0007
    return DataConfig(path=str(root / "wds"), image_column="sar.npy", text_column=CAPTIONS, resolution=16,
                      val_fraction=0.25, holdout_fraction=0.0)


def _csv(root: Path) -> DataConfig:
    """The same 8 scenes and captions as a folder of 16-bit PNGs with a 3-caption CSV."""
    (root / "csv").mkdir()
    lines = ["file_name,short,mid,long"]
    for i in range(8):
        k = f"{i:04d}"
        Image.fromarray(np.round(np.abs(slc(k)) * 1000).astype(np.uint16)).save(root / "csv" / f"{k}.png")
        c = meta(k)["caption"]
        lines.append(f"{k}.png,{c['SHORT']},{c['MID']},{c['LONG']}")
    (root / "csv" / "captions.csv").write_text("\n".join(lines) + "\n")
    return DataConfig(path=str(root / "csv"), text_column=["short", "mid", "long"], resolution=16,
                      val_fraction=0.25, holdout_fraction=0.0)


def _image_key(path: str) -> str:
    """The scene key of a row's `path` (``.../shard-000001.tar:0004`` or ``.../0004.png``)."""
    return path.rsplit(":", 1)[-1].rsplit("/", 1)[-1].split(".")[0]


def _choices(order: EpochOrder) -> dict[tuple[int, int], str]:
    """{(row key, epoch): caption} of what `order` trains on over EPOCHS epochs."""
    seen = {}
    for e in range(EPOCHS):
        for cols in order.epoch(e):
            for key, text in zip(cols["key"], cols["text"]):
                seen[int(key), e] = str(text)
    return seen


@pytest.mark.parametrize("source", [_wds, _csv], ids=["webdataset", "csv"])
def test_each_epoch_samples_one_caption_per_image_the_same_for_the_same_seed(ray_local, tmp_path, source):
    cfg = source(tmp_path)
    data = build_datasets(cfg, seed=0)
    assert data.materialized and data.n_train + data.n_val == 8 and data.n_val >= 1
    rows = data.train.take_all()
    by_key = {int(r["key"]): r for r in rows}
    for r in rows:  # every candidate travels, prefixed, in text_column's order
        assert list(r["texts"]) == _candidates(_image_key(r["path"]))

    seen = _choices(EpochOrder(data.train, batch_size=1, seed=0, rank=0, in_memory=True))
    assert len(seen) == data.n_train * EPOCHS  # every image, every epoch
    for (key, e), text in seen.items():
        assert text == epoch_caption(by_key[key]["texts"], key, e, 0)  # (image, epoch, seed) only
    per_image = defaultdict(set)
    for (key, _), text in seen.items():
        per_image[key].add(text)
    assert max(map(len, per_image.values())) >= 2  # an image trains under more than one caption
    assert len({t for ts in per_image.values() for t in ts}) > data.n_train  # not one caption an image

    # The same seed, another reader of the rows (streamed, in another order): the same captions.
    assert _choices(EpochOrder(data.train, batch_size=1, seed=0, rank=0, in_memory=False)) == seen
    assert _choices(EpochOrder(data.train, batch_size=1, seed=1, rank=0, in_memory=True)) != seen

    # Validation reads `text` as the rows hold it: one fixed caption per image, by its name's hash.
    val = data.val.take_all()
    assert len(val) == data.n_val
    for r in val:
        name = _image_key(r["path"]) if source is _wds else Path(r["path"]).name
        assert r["text"] == pick_text(list(r["texts"]), stable_hash(name) >> 1)


def test_single_caption_rows_stay_as_they_were(ray_local, tmp_path):
    cfg = _wds(tmp_path).model_copy(update={"text_column": ["caption.MID"]})  # a list of one
    data = build_datasets(cfg, seed=0)
    row = data.train.take(1)[0]
    assert sorted(row) == ["crop_top_left", "original_size", "path", "pixel_values", "text"]
    cols = next(EpochOrder(data.train, batch_size=2, seed=0, rank=0, in_memory=True).epoch(1))
    assert "texts" not in cols and all(t.startswith("<SAR> a SAR scene number") for t in cols["text"])


def test_cached_trial_trains_under_per_epoch_captions_and_validates_under_fixed_ones(ray_local, tmp_path,
                                                                                      monkeypatch):
    """The latent cache carries every candidate: a cached trial (no encoder call) trains an image
    under more than one caption over its 3 epochs, exactly those `epoch_caption` gives for its
    seed, and every validation pass sees the same captions."""
    monkeypatch.chdir(tmp_path)  # the latent cache lands here
    dcfg = _wds(tmp_path)
    trained: dict[tuple[int, int], str] = {}
    validated: list[list[str]] = []
    epoch = EpochOrder.epoch

    def recording_epoch(self, e, skip=0):
        for cols in epoch(self, e, skip):
            trained.update({(int(k), e): str(t) for k, t in zip(cols["key"], cols["text"])})
            yield cols

    validation_loss = train.validation_loss

    def recording_validation(c, batch, *a, **kw):
        validated.append(list(batch.captions))
        return validation_loss(c, batch, *a, **kw)

    monkeypatch.setattr(EpochOrder, "epoch", recording_epoch)  # local mode: the loop runs here
    monkeypatch.setattr(train, "validation_loss", recording_validation)
    cfg = config.load(None, [
        "model.pretrained=tiny-sd", f"data.path={dcfg.path}", "data.image_column=sar.npy",
        f"data.text_column={json.dumps(CAPTIONS)}", "data.resolution=16", "data.val_fraction=0.25",
        "data.holdout_fraction=0", "data.cache=auto", "strategy.unet.mode=lora",
        "train.max_steps=9", "train.batch_size=2", "train.eval_every=3", "train.checkpoint_every=9",
        "train.eval_batches=1", "sample.prompts=[\"<SAR> scene 0001\"]", "sample.seeds=[0]", "sample.steps=1",
        "train.seed=3", f"out={tmp_path / 'out'}", "tracking.enabled=false",
    ]).trial()
    result = run_trial(cfg, progress=False)
    end = next(r for r in read_log(result.out / "train_log.jsonl") if r.get("event") == "end")
    assert end["vae_encoder_calls"] == 0  # it read the cached latents

    rows = {int(r["key"]): r for r in build_datasets(dcfg, seed=3).train.take_all()}
    assert {e for _, e in trained} == {0, 1, 2}  # 6 images, 3 steps an epoch
    for (key, e), text in trained.items():
        assert text == epoch_caption(rows[key]["texts"], key, e, 3)
    assert max(len({t for (k, _), t in trained.items() if k == key}) for key in rows) >= 2
    assert len(validated) >= 3 and all(v == validated[0] for v in validated)  # steps 3, 6, 9
    val = build_datasets(dcfg, seed=3).val.take_all()
    assert sorted(validated[0]) == sorted(r["text"] for r in val)  # the rows' fixed captions


def test_a_streamed_epoch_resumes_where_it_stopped_and_reshuffles_each_epoch(ray_local, tmp_path):
    """Shards read as a stream (data.materialize=never, what a 100k-scene set gets): an epoch's
    order is the seeded shard order plus a shuffle buffer seeded per epoch, so a resume that
    skips the micro-batches already consumed continues with exactly the rest of that epoch."""
    write_sarlo(tmp_path / "wds", n_shards=4, per_shard=6)  # 24 scenes
    cfg = DataConfig(path=str(tmp_path / "wds"), image_column="sar.npy", text_column="caption.MID",
                     resolution=16, val_fraction=0.0, holdout_fraction=0.0, materialize="never")
    data = build_datasets(cfg, seed=0)
    assert not data.materialized and data.n_train == 24

    def keys(seed: int, epoch: int, skip: int = 0) -> list[list[str]]:
        order = EpochOrder(data.train, batch_size=2, seed=seed, rank=0, in_memory=False)
        return [[_image_key(str(p)) for p in b["path"]] for b in order.epoch(epoch, skip)]

    e0, e1 = keys(0, 0), keys(0, 1)
    assert len(e0) == len(e1) == 12
    assert sorted(k for b in e0 for k in b) == sorted(k for b in e1 for k in b)  # every scene, once
    assert e0 != e1  # a new order each epoch
    assert keys(0, 1) == e1  # reproducible: what a resume relies on
    assert keys(0, 1, skip=5) == e1[5:]  # the resumed epoch: exactly the batches not yet used
