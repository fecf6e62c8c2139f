"""Synthetic SAR scenes: deterministic, speckle with the right statistics, captions by content."""

import json

import numpy as np
import pytest

from sar_ray.config import SynthConfig
from sar_ray.data import (
    AMPLITUDE_MAX,
    LABELS,
    generate_scene,
    layout_scene,
    read_image,
    read_table,
    scene_rng,
    speckle,
    synthetic_path,
    write_synthetic,
)
from sar_ray.data import synth
from sar_ray.data.synth import CLASSES


def _enl(intensity):
    """Equivalent number of looks: mean^2 / var of intensity."""
    return intensity.mean() ** 2 / intensity.var()


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(write_synthetic(tmp_path / "a", n=12, size=48, seed=3))
    b = _files(write_synthetic(tmp_path / "b", n=12, size=48, seed=3))
    c = _files(write_synthetic(tmp_path / "c", n=12, size=48, seed=4))
    assert a == b
    assert len(a) == 12 + 2  # images, metadata.jsonl, marker
    pngs = lambda f: sorted(v for k, v in f.items() if k.endswith(".png"))  # noqa: E731
    assert not set(pngs(a)) & set(pngs(c))
    # Scene i does not depend on n: a longer dataset starts with the same scenes.
    longer = _files(write_synthetic(tmp_path / "d", n=15, size=48, seed=3))
    assert all(longer[k] == v for k, v in a.items() if k.endswith(".png"))


@pytest.mark.parametrize("looks", [1, 4])
def test_speckle_enl_on_homogeneous_region(looks):
    amp = speckle(np.random.default_rng(0), np.full((256, 256), 0.05, np.float32), looks)
    intensity = amp.astype(np.float64) ** 2
    assert intensity.mean() == pytest.approx(0.05, rel=0.02)  # speckle keeps the mean
    assert _enl(intensity) == pytest.approx(looks, rel=0.1)


@pytest.mark.parametrize("looks", [1, 4])
def test_scene_is_sigma0_times_l_look_speckle(looks):
    # layout_scene draws first, so the same seed gives the scene's own sigma0.
    amp, _, _ = generate_scene(np.random.default_rng(11), 128, looks)
    sigma0 = layout_scene(np.random.default_rng(11), 128).sigma0
    ratio = amp.astype(np.float64) ** 2 / sigma0
    assert ratio.mean() == pytest.approx(1.0, rel=0.03)
    assert _enl(ratio) == pytest.approx(looks, rel=0.1)


def test_forest_is_textured_beyond_speckle():
    # K-distribution: Gamma texture x speckle gives fewer apparent looks than speckle alone.
    enls = []
    for i in range(60):
        rng = np.random.default_rng(i)
        layout = layout_scene(np.random.default_rng(i), 128)
        amp, _, _ = generate_scene(rng, 128, 4)
        forest = layout.classes == CLASSES.index("forest")
        if forest.sum() > 2000:
            enls.append(_enl(amp[forest].astype(np.float64) ** 2))
    assert len(enls) >= 5
    assert np.median(enls) < 0.85 * 4


def test_water_darker_than_fields_darker_than_urban():
    means = {c: [] for c in CLASSES}
    for i in range(60):
        layout = layout_scene(np.random.default_rng(i), 96)
        amp = speckle(np.random.default_rng(i), layout.sigma0, 4)
        for k, c in enumerate(CLASSES):
            if (layout.classes == k).sum() > 500:
                means[c].append(amp[layout.classes == k].mean())
    m = {c: np.mean(v) for c, v in means.items()}
    assert m["water"] * 2 < m["fields"] < m["urban"]
    assert m["water"] * 3 < m["forest"]


def test_captions_vary_and_name_the_content():
    scenes = [generate_scene(scene_rng(0, i), 64, 4) for i in range(200)]
    captions = [c for _, c, _ in scenes]
    labels = {lab for _, _, lab in scenes}
    assert labels == set(LABELS)
    assert len(set(captions)) >= 15
    word = {"water": "open water", "ships": "ship", "fields": "agricultural fields",
            "vehicles": "vehicle", "forest": "forest", "urban": "urban area"}
    for _, caption, label in scenes:
        assert caption.startswith("<SAR> image of ")
        assert word[label] in caption, (label, caption)
    # Target scenes are the ones whose caption counts targets.
    assert all(("ship" in c) == (lab == "ships") for _, c, lab in scenes if lab in ("water", "ships"))


def test_written_png_is_amplitude_over_fixed_scale(tmp_path):
    out = write_synthetic(tmp_path / "s", n=3, size=64, seed=5, looks=4)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"].split("/")[0] for r in rows] == [r["label"] for r in rows]
    assert {tuple(sorted(r)) for r in rows} == {("file_name", "label", "text")}
    for i, row in enumerate(rows):
        amp, caption, label = generate_scene(scene_rng(5, i), 64, 4)
        assert (caption, label) == (row["text"], row["label"])
        stored = read_image(out / row["file_name"]) / 65535 * AMPLITUDE_MAX
        assert np.abs(stored - np.minimum(amp, AMPLITUDE_MAX)).max() <= AMPLITUDE_MAX / 65535
    records = read_table(out)  # the HF imagefolder layout reads back
    assert [r.text for r in records] == [r["text"] for r in rows]


def test_tiff_holds_linear_amplitude(tmp_path):
    out = write_synthetic(tmp_path / "t", n=2, size=32, seed=1, fmt="tiff")
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[1])
    assert row["file_name"].endswith(".tif")
    amp, _, _ = generate_scene(scene_rng(1, 1), 32, 4)
    assert np.array_equal(read_image(out / row["file_name"]), amp)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real = synth.generate_scene

    def fail_on_third(rng, size, looks):
        if fail_on_third.calls == 2:
            raise KeyboardInterrupt
        fail_on_third.calls += 1
        return real(rng, size, looks)

    fail_on_third.calls = 0
    monkeypatch.setattr(synth, "generate_scene", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "s", n=6, size=32)
    assert list(tmp_path.iterdir()) == []  # no half dataset, no temporary folder


def test_rewrite_is_a_no_op_and_foreign_folder_is_kept(tmp_path):
    out = write_synthetic(tmp_path / "s", n=4, size=32)
    stamp = (out / "metadata.jsonl").stat().st_mtime_ns
    assert write_synthetic(tmp_path / "s", n=4, size=32) == out
    assert (out / "metadata.jsonl").stat().st_mtime_ns == stamp
    # Other arguments replace our own folder...
    write_synthetic(tmp_path / "s", n=2, size=32)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2
    # ...but never a folder of the user's.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        write_synthetic(tmp_path / "mine", n=2, size=32)
    assert (tmp_path / "mine" / "keep.txt").exists()


def test_synthetic_path_is_cached_by_arguments(tmp_path):
    cfg = SynthConfig(n=5, size=32, seed=2, looks=3)
    p = synthetic_path(cfg, cache_root=tmp_path)
    assert p.is_absolute() and p.parent == tmp_path
    assert "n5" in p.name and "size32" in p.name and "seed2" in p.name and "looks3" in p.name
    assert synthetic_path(cfg, cache_root=tmp_path) == p
    assert synthetic_path(SynthConfig(n=5, size=32, seed=3, looks=3), cache_root=tmp_path) != p
    assert len(read_table(p)) == 5
