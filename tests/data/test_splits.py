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
    from sar_ray.data.dataset import build_datasets  # training reads neither the held-out nor val images

    assert build_datasets(synthetic(), 0).n_train == len(ref)
    again = study_splits(synthetic(), tmp_path / "again", n_anchor=3)
    assert _names(tmp_path / "again" / "holdout") == held  # deterministic


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
