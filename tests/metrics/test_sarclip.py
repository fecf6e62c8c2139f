"""SAR-CLIP: the evaluator learns SAR classes from captions; save/load round-trips."""

import json

import numpy as np
import pytest
import torch

from sar_ray.config import NormalizationConfig
from sar_ray.data.io import write_amplitude_png
from sar_ray.metrics import clip as sc

CLASSES = {"water": "open water", "fields": "agricultural fields", "forest": "a forest", "urban": "an urban area"}


def scene(rng, label, size=32):
    """Amplitude of a 4-look scene whose layout tells the class apart."""
    y, x = np.mgrid[:size, :size]
    if label == "water":
        s0 = np.full((size, size), 0.02)
    elif label == "fields":  # parcels in stripes
        p = int(rng.integers(6, 10))
        s0 = np.where(((x + rng.integers(p)) // (p // 2)) % 2 == 0, 0.3, 0.05)
    elif label == "forest":  # K-distributed texture
        s0 = 0.15 * rng.gamma(2.0, 0.5, (size, size))
    else:  # street grid of bright walls
        o = int(rng.integers(8))
        s0 = np.full((size, size), 0.03)
        s0[((y + o) % 8 < 2) | ((x + o) % 8 < 2)] = 1.0
    return np.sqrt(s0 * rng.gamma(4, 1 / 4, (size, size)))


def write_class_set(out, n, seed):
    """An imagefolder of n scenes cycling through the four classes, one caption per class."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = list(CLASSES)[i % 4]
        write_amplitude_png(out / f"{i:04d}.png", scene(rng, label) / 1.5)
        rows.append({"file_name": f"{i:04d}.png", "text": f"<SAR> image of {CLASSES[label]}", "label": label})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def held_out_retrieval(clip: sc.SarClip, folder) -> float:
    from sar_ray.data.captions import read_table

    records = read_table(folder)
    images = np.stack([sc.load_record_image(r, NormalizationConfig(), None) for r in records])
    prompts = sorted({r.text for r in records})
    index = np.array([prompts.index(r.text) for r in records])
    return float(sc.retrieval_hits(clip.encode_images(images), clip.encode_texts(prompts), index).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sarclip")
    train = write_class_set(root / "train", 96, seed=0)
    held = write_class_set(root / "held", 40, seed=1)
    torch.set_num_threads(2)
    result = sc.train_clip(train, root / "model", epochs=10, batch_size=24, lr=1e-3, seed=0, val_fraction=0.1)
    return result, held


def test_trained_clip_retrieves_held_out_classes_untrained_is_chance(trained):
    result, held = trained
    assert result.losses[-1] < result.losses[0]
    clip = sc.load_clip(result.path, device="cpu")
    assert held_out_retrieval(clip, held) >= 0.8  # chance: 1 / 4
    assert result.n_val > 0 and result.val_retrieval_top1 > result.val_chance  # its own split
    import open_clip

    untrained = sc.SarClip(sc.build_clip("tiny", seed=0), open_clip.SimpleTokenizer(), sc._preprocess_cfg(sc.model_config("tiny")))
    assert abs(held_out_retrieval(untrained, held) - 0.25) <= 0.15


def test_saved_model_is_an_open_clip_local_dir_and_round_trips(trained):
    import open_clip

    result, held = trained
    meta = json.loads((result.path / sc.CONFIG_NAME).read_text())
    assert meta["model_cfg"] == sc.model_config("tiny") and meta["sar_ray"]["arch"] == "tiny"
    assert (result.path / sc.WEIGHTS_NAME).is_file()
    plain = open_clip.create_model(f"local-dir:{result.path}")  # no sar-ray needed to load it
    clip = sc.load_clip(result.path, device="cpu")
    for a, b in zip(plain.state_dict().values(), clip.model.state_dict().values()):
        assert torch.equal(a, b)
    # --pretrained from the saved folder starts from exactly these weights.
    again = sc.build_clip("tiny", pretrained=result.path, seed=123)
    for a, b in zip(again.state_dict().values(), clip.model.state_dict().values()):
        assert torch.equal(a, b)


def test_prefix_is_stripped_for_the_evaluator(trained):
    clip = sc.load_clip(trained[0].path, device="cpu")
    a = clip.encode_texts(["<SAR> image of a forest"])
    b = clip.encode_texts(["image of a forest"])
    np.testing.assert_array_equal(a, b)


def test_clip_score_and_retrieval_on_known_vectors():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(sc.clip_scores(img, txt), [100.0, 0.0, 80.0])  # negative cos -> 0
    prompts = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert sc.retrieval_hits(img, prompts, np.array([0, 1, 0])).tolist() == [True, True, False]


def test_embedding_distances_zero_against_itself_and_fd_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(0.5, 1.0, size=(30, 8))
    same = sc.embedding_distances(a, a, kid_subsets=10)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and same["kid"] == 0.0
    assert same["kid_raw"] < 0  # the unbiased estimate of a set against itself; reported as 0
    ab, ba = sc.embedding_distances(a, b, kid_subsets=10), sc.embedding_distances(b, a, kid_subsets=10)
    assert ab["fd"] == pytest.approx(ba["fd"], rel=1e-6) and ab["fd"] > 1.0
    assert ab["kid"] > same["kid"]


def test_bad_arch_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(sc.ClipError, match="unknown CLIP architecture 'nope'.*tiny"):
        sc.build_clip("nope")
    with pytest.raises(sc.ClipError, match="not found"):
        sc.build_clip("tiny", pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(sc.ClipError, match="not a SAR-CLIP folder"):
        sc.load_clip(tmp_path)


# ------------------------------------------------------------------------------- caption columns


def write_two_caption_table(out, n=12, image_column="file_name", columns=("short", "long")):
    """n noise scenes whose caption columns differ (each names its scene and its column)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        write_amplitude_png(out / f"{i:04d}.png", rng.random((32, 32)))
        rows.append({image_column: f"{i:04d}.png", **{c: f"scene {i} {c}" for c in columns}})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def captions_seen(monkeypatch, folder, out, **kw):
    """train_clip on `folder`: the captions it tokenised in each epoch, then those of its held-out retrieval."""
    import open_clip

    seen = [[]]

    class Spy(open_clip.SimpleTokenizer):
        def __call__(self, texts, *a, **k):
            seen[-1].extend(texts)
            return super().__call__(texts, *a, **k)

    monkeypatch.setattr(open_clip, "SimpleTokenizer", Spy)
    # One batch of every training image per epoch (drop_last drops nothing).
    result = sc.train_clip(folder, out, epochs=4, batch_size=64, val_fraction=0.25, seed=3,
                           on_epoch=lambda epoch, loss: seen.append([]), **kw)
    return result, seen[:-1], seen[-1]


def test_several_caption_columns_train_one_per_image_and_epoch_as_diffusion_does(tmp_path, monkeypatch):
    from sar_ray.data.captions import read_table
    from sar_ray.data.dataset import epoch_caption, split_records, stable_hash

    folder = write_two_caption_table(tmp_path / "data")
    cols = ["short", "long"]
    result, epochs, retrieval = captions_seen(monkeypatch, folder, tmp_path / "a", text_column=cols)
    train, val = split_records(read_table(folder, text_column=cols), 0.25)
    by_scene = {r.name: r for r in train}
    per_image = {}
    for epoch, texts in enumerate(epochs):
        assert len(texts) == len(train)
        for text in texts:
            r = by_scene[f"{int(text.split()[1]):04d}.png"]
            # The caption a diffusion trial of train.seed 3 trains this image on in this epoch.
            assert text == epoch_caption(r.texts, stable_hash(r.name) >> 1, epoch, 3)
            per_image.setdefault(r.name, set()).add(text)
    assert any(len(v) == 2 for v in per_image.values())  # some image changes caption across epochs
    assert retrieval == sorted(r.text for r in val)  # held out: each image's fixed caption
    meta = json.loads((result.path / sc.CONFIG_NAME).read_text())["sar_ray"]
    assert meta["text_columns"] == cols and meta["image_column"] == "file_name"

    # Same seed: the same captions, also when DataLoader workers (started anew each epoch) read them.
    _, again, _ = captions_seen(monkeypatch, folder, tmp_path / "b", text_column=cols, num_workers=1)
    assert again == epochs


def _clip_meta(out):
    return json.loads((out / sc.CONFIG_NAME).read_text())["sar_ray"]


def test_cli_clip_train_reads_the_study_data_section_and_flags_win(tmp_path, capsys):
    from sar_ray.cli import main

    data = write_two_caption_table(tmp_path / "data", n=8, image_column="img", columns=("cap_a", "cap_b"))
    study = tmp_path / "study.yaml"
    study.write_text(f"data:\n  path: {data}\n  image_column: img\n  text_column: [cap_a, cap_b]\n"
                     "  normalization:\n    method: db\n    db_min: -40\n")
    base = ["clip", "train", "--config", str(study), "--epochs", "1", "--batch-size", "4", "-q"]
    assert main([*base, "--out", str(tmp_path / "c1")]) == 0, capsys.readouterr().err
    meta = _clip_meta(tmp_path / "c1")
    assert meta["data"] == str(data) and meta["image_column"] == "img"
    assert meta["text_columns"] == ["cap_a", "cap_b"]
    assert meta["normalization"]["method"] == "db" and meta["normalization"]["db_min"] == -40

    # Explicit flags win over the study: one column, another normalisation (its other settings kept).
    assert main([*base, "--out", str(tmp_path / "c2"), "--text-column", "cap_b", "--normalization", "percentile"]) == 0
    meta = _clip_meta(tmp_path / "c2")
    assert meta["text_columns"] == ["cap_b"] and meta["normalization"]["method"] == "percentile"
    assert meta["normalization"]["db_min"] == -40
    # --set changes the study as the other subcommands do.
    assert main([*base, "--out", str(tmp_path / "c3"), "--set", "data.text_column=cap_a"]) == 0
    assert _clip_meta(tmp_path / "c3")["text_columns"] == ["cap_a"]


def test_cli_clip_train_bad_columns_are_one_line_exit_2(tmp_path, capsys):
    from sar_ray.cli import main

    data = write_two_caption_table(tmp_path / "data", n=6)
    base = ["clip", "train", "--data", str(data), "--epochs", "1", "-q", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*base, "--text-column", "short,nope"]) == 2  # comma-separated: a list, each checked
    err = capsys.readouterr().err
    assert "no column 'nope'" in err and "short, long" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--image-column", "path"]) == 2
    err = capsys.readouterr().err
    assert "no column 'path'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["clip", "train", "--out", str(tmp_path / "o"), "--set", "data.path=x"]) == 2
    assert "--set needs --config" in capsys.readouterr().err


# ------------------------------------------------------------------------------- WebDataset shards


def _shards():
    """tests/data/shards.py: tiny shards in SARLO-80's layout (KEY.sar.npy complex64 SLC,
    KEY.sar.png, KEY.meta.json with caption.SHORT / MID / LONG), as the data tests write them."""
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "data")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import shards

    return shards


def test_webdataset_shards_train_on_their_samples_and_captions_per_epoch_as_diffusion_does(tmp_path, monkeypatch):
    from sar_ray.data.dataset import epoch_caption, image_key, prepare_image, split_records
    from sar_ray.data.webdataset import pick_text

    shards = _shards()
    shards.write_sarlo(tmp_path / "wds", n_shards=3, per_shard=4)
    pattern = str(tmp_path / "wds" / "shard-{000000..000001}.tar")  # a brace pattern: the first 8 samples
    cols = ["caption.SHORT", "caption.LONG"]
    keys = [f"{i:04d}" for i in range(8)]

    def texts(key):
        return [shards.meta(key)["caption"]["SHORT"], shards.meta(key)["caption"]["LONG"]]

    # What it reads: one record per sample, named by its key (training's split and caption
    # hash), every candidate caption, and the SLC member read as amplitude |s|, normalised.
    records = sc._records(pattern, image_column="sar.npy", text_column=cols)
    assert [r.name for r in records] == keys
    norm = NormalizationConfig()
    for r in records:
        assert r.texts == tuple(texts(r.name)) and r.text == pick_text(texts(r.name), image_key(r.name))
        want = prepare_image(np.abs(shards.slc(r.name)), norm, 32, "center", None)
        np.testing.assert_allclose(sc.load_record_image(r, norm, 32), want, rtol=1e-6)

    result, epochs, retrieval = captions_seen(monkeypatch, pattern, tmp_path / "m", image_column="sar.npy",
                                              text_column=cols)
    from sar_ray.data.captions import Record

    # The split of a diffusion trial on these shards (by sample key), the captions it draws.
    train, val = split_records([Record(None, None, "", None, k) for k in keys], 0.25)
    train_keys = {r.name for r in train}
    assert (result.n_train, result.n_val) == (len(train), len(val))
    per_image = {}
    for epoch, seen in enumerate(epochs):
        assert len(seen) == len(train)
        by_key = {t.rsplit(" ", 1)[-1]: t for t in seen}  # each caption ends with its scene key
        assert set(by_key) == train_keys
        for k, t in by_key.items():
            assert t == epoch_caption(texts(k), image_key(k), epoch, 3)
            per_image.setdefault(k, set()).add(t)
    assert any(len(v) == 2 for v in per_image.values())  # captions change across epochs
    assert retrieval == sorted(pick_text(texts(r.name), image_key(r.name)) for r in val)  # the fixed ones
    meta = _clip_meta(result.path)
    assert meta["data"] == pattern and meta["image_column"] == "sar.npy" and meta["text_columns"] == cols


def test_cli_clip_train_on_the_sarlo80_study_takes_its_columns_and_train_seed(tmp_path, capsys):
    from pathlib import Path

    from sar_ray.cli import main

    _shards().write_sarlo(tmp_path / "wds", n_shards=2, per_shard=4)
    study = Path(__file__).resolve().parents[2] / "sweeps" / "sarlo80.yaml"
    base = ["clip", "train", "--config", str(study), "--set", f"data.path={tmp_path / 'wds'}",
            "--epochs", "1", "--batch-size", "4", "-q"]
    assert main([*base, "--set", "train.seed=7", "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    meta = _clip_meta(tmp_path / "a")
    assert meta["data"] == str(tmp_path / "wds") and meta["image_column"] == "sar.npy"
    assert meta["text_columns"] == ["caption.SHORT", "caption.MID", "caption.LONG"]
    assert meta["normalization"]["method"] == "reference" and meta["n_train"] + meta["n_val"] == 8
    assert meta["seed"] == 7  # the study's train.seed: a trial's own per-epoch captions
    # --seed still wins; without --config the default is 0.
    assert main([*base, "--set", "train.seed=7", "--seed", "2", "--out", str(tmp_path / "b")]) == 0
    assert _clip_meta(tmp_path / "b")["seed"] == 2
    assert main(["clip", "train", "--data", str(tmp_path / "wds"), "--image-column", "sar.png", "--text-column",
                 "caption.MID", "--epochs", "1", "-q", "--out", str(tmp_path / "c")]) == 0
    assert _clip_meta(tmp_path / "c")["seed"] == 0 and _clip_meta(tmp_path / "c")["image_column"] == "sar.png"


def test_cli_clip_train_bad_shards_are_diffusions_one_line_exit_2(tmp_path, capsys):
    import re

    from sar_ray.cli import main

    shards = _shards()
    good = shards.sample("0001")
    cases = {  # the messages `sar-ray trial` gives for the same shards (tests/data/test_webdataset.py)
        "missing member": ({"sar.png": good["sar.png"], "meta.json": good["meta.json"]}, [],
                           r"shard-000000.tar: sample 0001: no member 'sar.npy' \(members: meta.json, sar.png\)"),
        "json path": (good, ["--text-column", "caption.XL"],
                      r"shard-000000.tar: sample 0001: meta.json has no 'caption.XL' \(paths found: id, caption.SHORT"),
    }
    for case, (members, flags, message) in cases.items():
        shards.write_shard(tmp_path / case / "shard-000000.tar", {"0001": members})
        capsys.readouterr()
        code = main(["clip", "train", "--data", str(tmp_path / case), "--image-column", "sar.npy",
                     "--text-column", "caption.MID", *flags, "--epochs", "1", "-q", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), (case, err)
    assert not (tmp_path / "o").exists()

    # A later shard whose samples lack the member: data.on_corrupt as in training (error: the
    # first problem and the count; skip: trained without them).
    shards.write_sarlo(tmp_path / "mixed", n_shards=2, per_shard=3)
    shards.write_shard(tmp_path / "mixed" / "shard-000002.tar", {k: {"meta.json": shards.sample(k)["meta.json"]}
                                                                  for k in ("0006", "0007")})
    study = tmp_path / "study.yaml"
    study.write_text(f"data:\n  path: {tmp_path / 'mixed'}\n  image_column: sar.npy\n  text_column: caption.MID\n")
    base = ["clip", "train", "--config", str(study), "--epochs", "1", "-q"]
    capsys.readouterr()
    assert main([*base, "--set", "data.on_corrupt=error", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(
        r"shard-000002.tar: sample 0006: no member 'sar.npy'.*\(2 of 8 images in .*mixed unusable; set "
        r"data.on_corrupt=skip", err), err
    assert main([*base, "--out", str(tmp_path / "s")]) == 0  # data.on_corrupt: skip (the default)
    meta = _clip_meta(tmp_path / "s")
    assert meta["n_train"] + meta["n_val"] == 6
