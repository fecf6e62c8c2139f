"""The splits of a study's real images: train, validation, held out, reference; the held-out
anchor disjoint from training and reference, and an overlapping given set refused."""

import json
import shutil

import pytest

from sar_ray.config import DataConfig
from sar_ray.data.captions import Record
from sar_ray.data.splits import SplitError, split_three, study_splits


def recs(n):
    return [Record(f"/x/{i}.png", None, "t", None, f"img-{i}.png") for i in range(n)]


def test_splits_are_disjoint_deterministic_and_keep_validation_as_before():
    from sar_ray.data.dataset import split_records

    records = recs(400)
    train, val, held = split_three(records, 0.1, 0.15)
    names = [{r.name for r in part} for part in (train, val, held)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == 400
    assert 30 <= len(held) <= 90 and 15 <= len(val) <= 70  # the fractions, by hash
    assert split_three(list(reversed(records)), 0.1, 0.15)[2] == list(reversed(held))  # order-free membership
    assert val == split_records(records, 0.1)[1]  # adding a holdout never moves a validation image
    # An image stays on its side when others are added.
    more_held = {r.name for r in split_three(records + recs(600)[400:], 0.1, 0.15)[2]}
    assert names[2] <= more_held
    # Small sets: at least one held-out image, training keeps one; 0 means none.
    train, val, held = split_three(recs(3), 0.0, 0.1)
    assert len(held) == 1 and len(train) == 2
    assert split_three(recs(10), 0.1, 0.0)[2] == []


def synthetic(n=16):
    return DataConfig.model_validate({"synthetic": {"n": n, "size": 16}, "val_fraction": 0.25, "resolution": 16})


def _names(folder):
    return [json.loads(x)["file_name"] for x in (folder / "metadata.jsonl").read_text().splitlines()]


def test_synthetic_data_gets_a_held_out_anchor_disjoint_from_training_and_reference(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    s = study_splits(synthetic(), tmp_path / "splits", n_anchor=3)
    held, ref = _names(tmp_path / "splits" / "holdout"), _names(tmp_path / "splits" / "reference")
    assert s.n_holdout == len(held) >= 1 and len(held) <= 3 and not set(held) & set(ref)
    assert ("only %d of the 3 images a trial generates" % len(held) in s.note) == (len(held) < 3)
    from sar_ray.data.dataset import build_datasets  # training reads neither the held-out nor val images

    assert build_datasets(synthetic(), 0).n_train == len(ref)
    again = study_splits(synthetic(), tmp_path / "again", n_anchor=3)
    assert _names(tmp_path / "again" / "holdout") == held and again.n_holdout == s.n_holdout  # deterministic


def test_a_held_out_set_overlapping_training_or_reference_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_splits(synthetic(), tmp_path / "splits", n_anchor=2)
    training_image = _names(tmp_path / "splits" / "reference")[0]
    given = tmp_path / "mine"
    given.mkdir()
    shutil.copy(training_image, given / "renamed.png")  # a copy under another name still overlaps
    with pytest.raises(SplitError, match="search.holdout .* shares 1 of its 1 images with the training data") as e:
        study_splits(synthetic(), tmp_path / "s2", n_anchor=2, holdout=str(given))
    assert "\n" not in str(e.value)
    # The default held-out split against a given reference that contains it: refused too.
    ref = tmp_path / "ref"
    shutil.copytree(tmp_path / "splits" / "holdout", ref)
    held = _names(ref)
    for i, name in enumerate(held):
        shutil.copy(name, ref / f"{i}.png")
    (ref / "metadata.jsonl").unlink()
    with pytest.raises(SplitError, match="held-out split .* search.reference"):
        study_splits(synthetic(), tmp_path / "s3", n_anchor=2, reference=str(ref))


def test_an_unreadable_image_of_data_path_is_left_out_of_the_anchor_and_the_reference_under_on_corrupt_skip(
        tmp_path, monkeypatch, ray_local):
    """data.on_corrupt: skip (the default) leaves a corrupt image out of training; the sweep's
    real sets are made of the same images, so they leave it out too (and say so) instead of
    failing the whole sweep at its first anchor. on_corrupt: error names the file."""
    import numpy as np
    from PIL import Image

    from sar_ray.config import EvalConfig
    from sar_ray.data.captions import read_table
    from sar_ray.data.io import ImageReadError
    from sar_ray.data.splits import anchor_sample
    from sar_ray.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "chips"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(root / f"c{i:02d}.png")
        rows.append(json.dumps({"file_name": f"c{i:02d}.png", "text": "<SAR> chip"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    data = DataConfig.model_validate({"path": str(root), "resolution": 16, "val_fraction": 0.1,
                                      "holdout_fraction": 0.3})
    train, _, held = split_three(read_table(root), 0.1, 0.3)
    first_held, a_train = anchor_sample(held, 1)[0], train[0]
    for r in (first_held, a_train):
        (root / r.name).write_bytes(b"\x89PNG\r\n\x1a\n not a png")

    s = study_splits(data, tmp_path / "splits", n_anchor=3)
    held_names = [n.rsplit("/", 1)[-1] for n in _names(tmp_path / "splits" / "holdout")]
    assert first_held.name not in held_names and len(held_names) == min(3, len(held) - 1)
    assert "1 unreadable left out" in s.note and first_held.name in s.note

    cfg = EvalConfig(bootstrap=0)
    with pytest.raises(ImageReadError, match=a_train.name):
        evaluate(s.holdout, s.reference, cfg, progress=False)  # as before: a plain evaluate names the file
    scored = evaluate(s.holdout, s.reference, cfg, progress=False, skip_unreadable_reference=True)
    assert scored.n_reference == len(train) - 1
    assert any(f"left out 1 unreadable of {len(train)}" in w and a_train.name in w for w in scored.warnings)

    strict = data.model_copy(update={"on_corrupt": "error"})
    with pytest.raises(ImageReadError, match=f"{first_held.name}.*data.on_corrupt=skip"):
        study_splits(strict, tmp_path / "strict", n_anchor=3)


def test_training_never_takes_the_held_out_image_when_a_small_sets_split_loses_an_unreadable_one(tmp_path, ray_local):
    """build_datasets split the readable images only, the sweep's splits every image: on a small
    set the split's fallbacks then disagree. Of c00..c02 (c00 validation, c01 held out, c02 train),
    an unreadable c02 left training with c01, the image the sweep scores as `real (held out)`."""
    import numpy as np
    from PIL import Image

    from sar_ray.data import DataError, build_datasets
    from sar_ray.data.captions import read_table

    root = tmp_path / "chips"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i + 20, np.uint8)).save(root / f"c{i:02d}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"c{i:02d}.png", "text": "t"}) + "\n"
                                                 for i in range(3)))
    train, val, held = split_three(read_table(root), 0.25, 0.1)
    assert [[r.name for r in part] for part in (train, val, held)] == [["c02.png"], ["c00.png"], ["c01.png"]]
    (root / "c02.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    data = DataConfig.model_validate({"path": str(root), "resolution": 16, "val_fraction": 0.25,
                                      "holdout_fraction": 0.1, "on_corrupt": "skip"})
    with pytest.raises(DataError, match="none of its training images is readable"):
        build_datasets(data, seed=0)
