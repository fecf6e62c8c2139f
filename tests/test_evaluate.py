"""`sar-ray evaluate` / `evaluate.score`: Ray Data pipelines over image folders, and bad input."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sar_ray.cli import main
from sar_ray.config import EvalConfig, NormalizationConfig
from sar_ray.data.dataset import load_folder_arrays
from sar_ray.data.io import write_amplitude_png, write_tiff
from sar_ray.data.synth import write_synthetic
from sar_ray.evaluate import METRIC_DIRECTION, evaluate, mark_model_output, metric_direction, score, score_arrays
from sar_ray.metrics.families import is_interval_key

N, SIZE = 12, 32


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    a = write_synthetic(root / "a", n=N, size=SIZE, seed=0)
    b = write_synthetic(root / "b", n=N, size=SIZE, seed=1)
    return root, a, b


def sampler_folder(out, images, prompts):
    """What the sampler writes: [0, 1] amplitude as 16-bit PNG + metadata.jsonl with prompts,
    marked as model output (samples.json)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, text) in enumerate(zip(images, prompts)):
        write_amplitude_png(out / f"{i:05d}.png", img)
        rows.append({"file_name": f"{i:05d}.png", "text": text, "seed": i})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mark_model_output(out)
    return out


def test_set_against_itself_every_distance_is_zero_and_files_are_written(ray_local, sets, tmp_path):
    _, a, _ = sets
    cfg = EvalConfig(generated_normalized=False)  # both sets real SAR: normalise both
    result = evaluate(a, a, cfg, out=tmp_path / "m" / "metrics.json", progress=False)
    assert result.n_generated == result.n_reference == N
    assert {"stats/kl", "stats/js", "stats/wasserstein", "stats/ks", "stats/enl_gap",
            "glcm/frechet", "glcm/rel_mean_diff", "glcm/wasserstein"} <= set(result.metrics)
    assert any(k.startswith("stats/kl/") for k in result.metrics)  # per class, from the labels
    assert all(v == 0 for v in result.metrics.values()), {k: v for k, v in result.metrics.items() if v}
    doc = json.loads(result.metrics_path.read_text())
    assert doc["metrics"] == result.metrics and doc["n_reference"] == N
    assert doc["direction"]["stats/kl"] == "min"
    table = pd.read_parquet(result.per_image_path)
    assert len(table) == 2 * N and {"set", "name", "enl", "cv", "glcm_contrast_d1"} <= set(table.columns)
    assert result.per_image_path.name == "metrics_per_image.parquet"


def test_parquet_table_with_embedded_images(ray_local, sets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, a, _ = sets
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    table = pa.table({
        "file_name": [(a / r["file_name"]).read_bytes() for r in rows],  # the encoded PNGs
        "text": [r["text"] for r in rows],
        "label": [r["label"] for r in rows],
    })
    pq.write_table(table, tmp_path / "set.parquet")
    cfg = EvalConfig(generated_normalized=False)
    m = score(tmp_path / "set.parquet", a, cfg)
    assert all(v == 0 for k, v in m.items() if not is_interval_key(k)) and "stats/kl" in m


def test_every_metric_has_a_direction():
    assert metric_direction("stats/kl/water") == "min"
    assert metric_direction("glcm/rel_mean_diff/contrast") == "min"
    assert metric_direction("clip/score") == "max" and metric_direction("clip/retrieval_top1") == "max"
    with pytest.raises(KeyError):
        metric_direction("nope/x")
    assert set(METRIC_DIRECTION.values()) == {"min", "max"}


def test_pipeline_equals_in_memory_scoring_and_is_symmetric(ray_local, sets):
    _, a, b = sets
    cfg = EvalConfig(generated_normalized=False, per_class=False)
    ab, ba = score(a, b, cfg), score(b, a, cfg)
    ref_imgs, _ = load_folder_arrays(b, cfg.normalization)
    gen_imgs, _ = load_folder_arrays(a, cfg.normalization)
    direct = score_arrays(gen_imgs, ref_imgs, cfg)
    assert set(direct) == set(ab)
    for k, v in direct.items():
        assert ab[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for k in ("stats/js", "stats/wasserstein", "stats/ks", "glcm/rel_mean_diff"):
        assert ab[k] == pytest.approx(ba[k], rel=1e-9) and ab[k] > 0


def test_sampler_output_is_compared_in_the_training_normalisation(ray_local, sets, tmp_path):
    # A "generator" that returns the reference images exactly as training saw them: the sampler
    # folder holds [0, 1] normalised amplitude, the reference raw SAR. Distances ~ 0 only if
    # the reference is normalised and the samples are not normalised a second time.
    _, a, _ = sets
    norm = NormalizationConfig()
    images, records = load_folder_arrays(a, norm)
    gen = sampler_folder(tmp_path / "samples", images, [r.text for r in records])
    m = score(gen, a, EvalConfig(normalization=norm, per_class=False))
    assert m["stats/ks"] < 1e-3 and m["stats/wasserstein"] < 1e-4  # 16-bit rounding only
    assert m["glcm/rel_mean_diff"] < 1e-3
    wrong = score(gen, a, EvalConfig(normalization=norm, per_class=False, generated_normalized=False))
    assert wrong["stats/ks"] > 10 * m["stats/ks"]  # normalising the samples again is detectably off


def test_clip_family_in_the_pipeline(ray_local, sets, tmp_path):
    from sar_ray.metrics.clip import build_clip, save_clip

    _, a, _ = sets
    clip_dir = save_clip(build_clip("tiny", seed=0), tmp_path / "clip", "tiny")
    images, records = load_folder_arrays(a, NormalizationConfig())
    gen = sampler_folder(tmp_path / "samples", images, [r.text for r in records])
    cfg = EvalConfig(metrics=["stats", "glcm", "clip"], clip=str(clip_dir), clip_batch_size=5, kid_subsets=5)
    result = evaluate(gen, a, cfg, out=tmp_path / "out", progress=False)
    m = result.metrics
    assert 0 <= m["clip/score"] <= 100 and 0 <= m["clip/retrieval_top1"] <= 1
    assert m["clip/fd"] == pytest.approx(0, abs=1e-3) and m["clip/kid"] == pytest.approx(0, abs=1e-3)
    table = pd.read_parquet(result.per_image_path)
    assert table.loc[table.set == "generated", "clip_score"].notna().all()
    assert result.summary["clip"]["prompts"] == len({r.text for r in records})


# ------------------------------------------------------------------------------- CLI


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_a_table_and_writes_metrics(ray_local, sets, tmp_path, capsys):
    _, a, b = sets
    code, out, err = run(["evaluate", "--generated", str(a), "--reference", str(b), "--normalize-generated",
                          "--out", str(tmp_path / "metrics.json"), "-q", "--glcm-levels", "16"], capsys)
    assert code == 0, err
    assert "stats/kl" in out and "glcm/frechet" in out and "lower" in out
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["config"]["glcm_levels"] == 16 and (tmp_path / "metrics_per_image.parquet").is_file()


def test_cli_bad_input_is_a_clear_error(ray_local, sets, tmp_path, capsys):
    _, a, _ = sets
    ref = str(a)

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["evaluate", "--generated", str(empty), "--reference", ref, "-q"], capsys)
    assert code == 2 and "no images" in err

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("hello")
    (texts / "run.log").write_text("x")
    code, _, err = run(["evaluate", "--generated", str(texts), "--reference", ref, "-q"], capsys)
    assert code == 2 and "no images" in err and "notes.txt" in err

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "0.png").write_text("not a png")
    code, _, err = run(["evaluate", "--generated", str(fake), "--reference", ref, "-q"], capsys)
    assert code == 2 and "0.png" in err

    nan = tmp_path / "nan"
    nan.mkdir()
    img = np.full((SIZE, SIZE), 0.5, np.float32)
    write_tiff(nan / "0.tif", img)
    img[3, 4] = np.nan
    write_tiff(nan / "1.tif", img)
    code, _, err = run(["evaluate", "--generated", str(nan), "--reference", ref, "-q"], capsys)
    assert code == 2 and "1.tif" in err and "NaN" in err

    code, _, err = run(["evaluate", "--generated", str(tmp_path / "missing"), "--reference", ref, "-q"], capsys)
    assert code == 2 and "not found" in err

    code, _, err = run(["evaluate", "--generated", ref, "--reference", ref, "--metrics", "stats,clip", "-q"], capsys)
    assert code == 2 and "clip" in err

    code, _, err = run(["evaluate", "--generated", ref, "--reference", ref, "--metrics", "stats,colour", "-q"], capsys)
    assert code == 2 and "metrics" in err


def test_cli_prompts_missing(ray_local, sets, tmp_path, capsys):
    from sar_ray.metrics.clip import build_clip, save_clip

    _, a, _ = sets
    clip_dir = save_clip(build_clip("tiny"), tmp_path / "clip", "tiny")
    plain = tmp_path / "plain"  # images without metadata.jsonl: no prompts
    plain.mkdir()
    for i in range(3):
        write_amplitude_png(plain / f"{i}.png", np.full((SIZE, SIZE), 0.3))
    code, _, err = run(["evaluate", "--generated", str(plain), "--reference", str(a), "--clip", str(clip_dir), "-q"], capsys)
    assert code == 2 and "no prompt" in err and "metadata.jsonl" in err
    # Without CLIP metrics a plain folder is fine (per-class statistics are skipped).
    code, out, err = run(["evaluate", "--generated", str(plain), "--reference", str(a), "-q"], capsys)
    assert code == 0, err

    broken = tmp_path / "broken"  # a metadata row without its prompt
    broken.mkdir()
    for i in range(2):
        write_amplitude_png(broken / f"{i}.png", np.full((SIZE, SIZE), 0.3))
    (broken / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png"}\n')
    code, _, err = run(["evaluate", "--generated", str(broken), "--reference", str(a), "-q"], capsys)
    assert code == 2 and "row 1" in err


def test_cli_mixed_sizes_are_resized_with_a_warning(ray_local, sets, tmp_path, capsys):
    _, a, _ = sets
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(0)
    for i, side in enumerate([SIZE, 48, 20, SIZE]):
        write_amplitude_png(mixed / f"{i}.png", rng.random((side, side)))
    code, out, err = run(["evaluate", "--generated", str(mixed), "--reference", str(a), "-q"], capsys)
    assert code == 0, err
    assert "2 images were not 32x32 and were resized" in out


def test_cli_clip_train(tmp_path, capsys):
    data = write_synthetic(tmp_path / "data", n=16, size=32, seed=0)
    code, out, err = run(["clip", "train", "--data", str(data), "--out", str(tmp_path / "clip"),
                          "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25"], capsys)
    assert code == 0, err
    assert "epoch 1/1" in out and "saved" in out
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file()
    code, _, err = run(["clip", "train", "--data", str(data), "--out", str(tmp_path / "x"), "--arch", "nope"], capsys)
    assert code == 2 and "unknown CLIP architecture" in err


# ------------------------------------------------------------------------------- what it is given


def test_real_sar_as_generated_is_normalised_like_the_reference(ray_local, sets, tmp_path, capsys):
    # Two splits of one distribution of real SAR: close, whether --normalize-generated is given
    # or not (auto: no samples.json); forcing "model output" reports them far apart.
    _, a, b = sets
    args = ["evaluate", "--generated", str(a), "--reference", str(b), "-q", "--metrics", "stats"]
    code, out, err = run(args + ["--out", str(tmp_path / "auto.json")], capsys)
    assert code == 0, err
    assert "like the reference" in out and "samples.json" in out
    auto = json.loads((tmp_path / "auto.json").read_text())
    assert auto["normalization"]["generated"]["as"] == "like the reference"
    code, _, err = run(args + ["--normalize-generated", "--out", str(tmp_path / "forced.json")], capsys)
    assert code == 0, err
    code, out, err = run(args + ["--generated-is-model-output", "--out", str(tmp_path / "raw.json")], capsys)
    assert code == 0, err
    assert "model output" in out
    forced, raw = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("forced", "raw"))
    assert auto["metrics"] == forced
    assert auto["metrics"]["stats/js"] < 0.05 and raw["stats/js"] > 5 * auto["metrics"]["stats/js"]


def test_sample_folder_is_not_normalised_again_and_says_so(ray_local, sets, tmp_path):
    _, a, _ = sets
    norm = NormalizationConfig()
    images, records = load_folder_arrays(a, norm)
    gen = sampler_folder(tmp_path / "samples", images, [r.text for r in records])
    result = evaluate(gen, a, EvalConfig(normalization=norm, per_class=False, metrics=["stats"]), progress=False)
    assert result.normalization["generated"]["method"] == "none"
    assert "samples.json" in result.normalization["generated"]["why"]
    assert result.metrics["stats/ks"] < 1e-3  # the reference's own normalised images, 16-bit rounding only
    (gen / "samples.json").unlink()  # the same folder, no longer declared model output
    again = evaluate(gen, a, EvalConfig(normalization=norm, per_class=False, metrics=["stats"]), progress=False)
    assert again.normalization["generated"]["as"] == "like the reference"


def test_samples_of_a_model_trained_on_another_normalisation_are_scored_with_a_warning(ray_local, sets, tmp_path):
    """samples.json records the training's normalisation: a reference normalised otherwise
    (evaluate's default `reference` against a model trained on dB images) is named, with the fix."""
    _, a, _ = sets
    db = NormalizationConfig(method="db")
    images, records = load_folder_arrays(a, db)
    gen = sampler_folder(tmp_path / "samples", images, [r.text for r in records])
    mark_model_output(gen, normalization=db.model_dump(mode="json"))
    cfg = EvalConfig(per_class=False, metrics=["stats"], bootstrap=0)
    off = evaluate(gen, a, cfg, progress=False)
    (warning,) = [w for w in off.warnings if "normalised by" in w]
    assert "trained on images normalised by db(db_min=-30, db_max=0, amplitude)" in warning
    assert "reference is normalised by reference(k=3, amplitude)" in warning and "--normalization db" in warning
    same = evaluate(gen, a, cfg.model_copy(update={"normalization": db.model_copy(update={"k": 5.0})}), progress=False)
    assert not [w for w in same.warnings if "normalised by" in w]  # k is not read by db
    assert same.metrics["stats/ks"] < 1e-3 < off.metrics["stats/ks"]
    # Trained with a non-default setting: --normalization (the method only) would not fix it.
    mark_model_output(gen, normalization=NormalizationConfig(method="db", db_min=-25.0).model_dump(mode="json"))
    (warning,) = [w for w in evaluate(gen, a, cfg, progress=False).warnings if "normalised by" in w]
    assert "db(db_min=-25, db_max=0, amplitude)" in warning and "(--config STUDY.yaml)" in warning


def test_metrics_json_carries_intervals_that_contain_each_value(ray_local, sets, tmp_path):
    _, a, b = sets
    cfg = EvalConfig(generated_normalized=False, bootstrap=50)
    result = evaluate(a, b, cfg, out=tmp_path / "metrics.json", progress=False)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert set(doc["intervals"]) == set(doc["metrics"])
    for k, (lo, hi) in doc["intervals"].items():
        if doc["metrics"][k] is not None and lo is not None:
            assert lo <= doc["metrics"][k] <= hi, k
    assert doc["summary"]["bootstrap"]["resamples"] == 50
    flat = result.flat()
    assert flat["stats/js.ci_hi"] == result.intervals["stats/js"][1]  # what a sweep logs to MLflow


def test_generated_set_of_another_size_and_bit_depth_is_scored_with_warnings(ray_local, sets, tmp_path):
    from PIL import Image

    _, a, _ = sets
    odd = tmp_path / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # 8-bit, 48 x 48 against 16-bit 32 x 32 references
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(odd / f"{i}.png")
    result = evaluate(odd, a, EvalConfig(metrics=["stats"], bootstrap=0), out=tmp_path / "m.json", progress=False)
    assert np.isfinite(result.metrics["stats/js"])
    text = " ".join(result.warnings)
    assert "generated: 4 images were not 32x32 and were resized" in text and "48x48" in text
    assert "8-bit" in text and "16-bit" in text
    assert json.loads((tmp_path / "m.json").read_text())["warnings"] == result.warnings


def test_a_12_bit_reference_against_8_bit_samples_is_warned_about_not_a_crash():
    """A TIFF's BitsPerSample gives depths besides 8, 16 and float (12): the quantisation warning
    names it (it raised KeyError, and the whole evaluation with it)."""
    from types import SimpleNamespace

    from sar_ray.evaluate import _input_warnings

    def rows(depth):
        return SimpleNamespace(rows=[{"height": 8, "width": 8, "resized": False, "depth": depth}])

    (warning,) = _input_warnings({"generated": rows(8), "reference": rows(12)}, (8, 8))
    assert "generated images are 8-bit but the reference 12-bit" in warning
    assert _input_warnings({"generated": rows(12), "reference": rows(16)}, (8, 8)) == []


# ------------------------------------------------------------------------------- reference cache


def _reference_copy(a, dest):
    """A private copy of a synthetic set (the tests below touch and overwrite its files)."""
    import shutil

    shutil.copytree(a, dest)
    return dest


def test_reference_cache_hit_scores_the_same_without_describing_the_reference(ray_local, sets, tmp_path):
    _, a, b = sets
    ref = _reference_copy(b, tmp_path / "ref")
    cfg = EvalConfig(generated_normalized=False, size=SIZE, bootstrap=20, cache_dir=str(tmp_path / "cache"))
    plain = evaluate(a, ref, cfg.model_copy(update={"cache_dir": None}), progress=False)
    first = evaluate(a, ref, cfg, progress=False)
    assert first.summary["reference_cache"]["hit"] is False and len(list((tmp_path / "cache").iterdir())) == 1
    # Overwrite a reference image (not the first, which sizes nothing here: size is set) with
    # garbage of the same size and mtime: only a run that skips decoding the reference works.
    victim = sorted(p for p in ref.rglob("*.png"))[-1]
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = evaluate(a, ref, cfg, progress=False)
    assert second.summary["reference_cache"]["hit"] is True
    for r in (first, second):
        assert r.metrics == plain.metrics and r.intervals == plain.intervals
        assert r.n_reference == plain.n_reference and r.warnings == plain.warnings
    with pytest.raises(Exception, match=victim.name):  # without the cache the garbage is read
        evaluate(a, ref, cfg.model_copy(update={"cache_dir": None}), progress=False)


def test_reference_cache_misses_when_the_reference_or_a_describing_setting_changes(ray_local, sets, tmp_path):
    _, a, b = sets
    ref = _reference_copy(b, tmp_path / "ref")
    cfg = EvalConfig(generated_normalized=False, bootstrap=0, cache_dir=str(tmp_path / "cache"))
    hit = lambda c: evaluate(a, ref, c, progress=False).summary["reference_cache"]["hit"]  # noqa: E731
    assert not hit(cfg) and hit(cfg)
    assert not hit(cfg.model_copy(update={"glcm_levels": 32}))  # describe reads it
    assert not hit(cfg.model_copy(update={"normalization": NormalizationConfig(method="db")}))
    assert not hit(cfg.model_copy(update={"max_images": 6}))  # another listing
    assert hit(cfg.model_copy(update={"bootstrap": 10, "hist_smoothing": 1.0}))  # driver-side only
    os.utime(sorted(ref.rglob("*.png"))[3])  # a reference file changed (its mtime)
    assert not hit(cfg)


def test_a_corrupt_or_foreign_cache_entry_is_described_again_with_a_warning(ray_local, sets, tmp_path):
    import shutil

    _, a, b = sets
    cache = tmp_path / "cache"
    cfg = EvalConfig(generated_normalized=False, bootstrap=0, metrics=["stats"], cache_dir=str(cache))
    other = cfg.model_copy(update={"hist_bins": 64})
    want = {c.hist_bins: evaluate(a, b, c.model_copy(update={"cache_dir": None}), progress=False).metrics
            for c in (cfg, other)}
    entry = evaluate(a, b, cfg, progress=False).summary["reference_cache"]["path"]
    foreign = evaluate(a, b, other, progress=False).summary["reference_cache"]["path"]
    shutil.copy(entry, foreign)  # hist_bins=64's name, hist_bins=256's histograms
    r = evaluate(a, b, other, progress=False)
    assert r.metrics == want[64] and not r.summary["reference_cache"]["hit"]
    assert any("reference cache" in w and "another reference, eval config" in w for w in r.warnings)
    assert evaluate(a, b, other, progress=False).summary["reference_cache"]["hit"]  # rewritten
    Path(entry).write_bytes(Path(entry).read_bytes()[:200])  # truncated
    r = evaluate(a, b, cfg, progress=False)
    assert r.metrics == want[256] and any("reference cache" in w for w in r.warnings)


def test_a_reference_with_an_unreadable_image_left_out_is_cached_for_callers_that_skip_it(ray_local, sets, tmp_path):
    """A sweep scores every trial against a reference with data.on_corrupt=skip: one corrupt
    image there had each trial describe the whole reference again (it was never cached)."""
    from sar_ray.data.io import ImageReadError

    _, a, b = sets
    ref = _reference_copy(b, tmp_path / "ref")
    victim = sorted(ref.rglob("*.png"))[-1]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    cfg = EvalConfig(generated_normalized=False, size=SIZE, bootstrap=10, cache_dir=str(tmp_path / "cache"))
    first = evaluate(a, ref, cfg, progress=False, skip_unreadable_reference=True)
    second = evaluate(a, ref, cfg, progress=False, skip_unreadable_reference=True)
    assert not first.summary["reference_cache"]["hit"] and second.summary["reference_cache"]["hit"]
    assert second.metrics == first.metrics and second.n_reference == first.n_reference
    assert second.warnings == first.warnings and any("left out 1 unreadable" in w and victim.name in w
                                                     for w in second.warnings)
    with pytest.raises(ImageReadError, match=victim.name):  # a caller that reads every image is not served it
        evaluate(a, ref, cfg, progress=False)


def test_a_reference_contradicting_the_declared_depth_stops_even_a_caller_that_skips_unreadable_images(
        ray_local, sets, tmp_path):
    """16-bit references above the 4095 that `bits: 12` declares: a config mistake, so a sweep
    (which skips unreadable reference images) stops with it rather than leave them all out."""
    from sar_ray.data.normalize import DepthError

    _, a, b = sets
    cfg = EvalConfig(generated_normalized=True, size=SIZE, bootstrap=0,
                     normalization={"method": "none", "bits": 12})
    with pytest.raises(DepthError, match=r"is above the full scale 4095 that data\.normalization\.bits=12"):
        evaluate(a, b, cfg, progress=False, skip_unreadable_reference=True)


def test_a_left_out_reference_image_that_reads_again_but_contradicts_the_declared_depth_makes_the_entry_stale(
        sets, tmp_path):
    """The cache's recheck of a left-out image: one that now reads but breaks
    data.normalization.bits is not "still unreadable" (that kept it silently out)."""
    from sar_ray.data.io import read_image
    from sar_ray.evaluate import _Item, _unreadable

    _, _, b = sets
    png = max(sorted(b.rglob("*.png")), key=lambda p: read_image(p).max())  # a bright target: above 4095
    assert read_image(png).max() > 4095
    it = _Item(set="reference", index=0, name=png.name, path=str(png), image_bytes=None, text="", label=None)
    assert _unreadable(it, NormalizationConfig(method="none", bits=12), (SIZE, SIZE)) is False
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert _unreadable(_Item(set="reference", index=1, name="broken.png", path=str(broken), image_bytes=None,
                             text="", label=None), NormalizationConfig(method="none", bits=12), (SIZE, SIZE)) is True


def test_a_cached_reference_whose_left_out_image_reads_again_is_described_again(ray_local, sets, tmp_path):
    """An image left out for a passing error (a storage hiccup; an object store lists no mtime)
    stayed out of every later evaluation: the entry's key had not changed. Here the file's
    size and mtime are the same before and after, so the key is too."""
    import os

    _, a, b = sets
    ref = _reference_copy(b, tmp_path / "ref")
    victim = sorted(ref.rglob("*.png"))[-1]
    good, st = victim.read_bytes(), victim.stat()
    victim.write_bytes(b"\x89PNG\r\n\x1a\n".ljust(len(good), b"x"))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg = EvalConfig(generated_normalized=False, size=SIZE, bootstrap=10, cache_dir=str(tmp_path / "cache"))
    first = evaluate(a, ref, cfg, progress=False, skip_unreadable_reference=True)
    assert any("left out 1 unreadable" in w for w in first.warnings)
    victim.write_bytes(good)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    _age(first.summary["reference_cache"]["path"])
    again = evaluate(a, ref, cfg, progress=False, skip_unreadable_reference=True)
    assert not again.summary["reference_cache"]["hit"] and again.n_reference == first.n_reference + 1
    assert any("reads now" in w for w in again.warnings)
    assert not any("left out 1 unreadable" in w for w in again.warnings)


def _age(entry: str) -> None:
    """Make a cache entry look written (or last rechecked) longer ago than the recheck interval."""
    import time

    from sar_ray.evaluate import _RECHECK_S

    old = time.time() - _RECHECK_S - 60
    os.utime(entry, (old, old))


def test_a_cached_reference_reads_its_left_out_images_again_at_most_once_per_interval(
        ray_local, sets, tmp_path, monkeypatch):
    """A sweep loads the entry once per trial: each load read every left-out image again (100k
    scenes with a bad shard: thousands of reads per trial). Now only an entry older than the
    interval is rechecked, and a recheck that finds them still unreadable restarts it."""
    import sar_ray.evaluate as ev

    _, a, b = sets
    ref = _reference_copy(b, tmp_path / "ref")
    victim = sorted(ref.rglob("*.png"))[-1]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    cfg = EvalConfig(generated_normalized=False, size=SIZE, bootstrap=0, metrics=["stats"],
                     cache_dir=str(tmp_path / "cache"))
    run = lambda: evaluate(a, ref, cfg, progress=False, skip_unreadable_reference=True)  # noqa: E731
    entry = run().summary["reference_cache"]["path"]
    reads = []
    real = ev._unreadable
    monkeypatch.setattr(ev, "_unreadable", lambda it, *args: reads.append(it.name) or real(it, *args))
    assert run().summary["reference_cache"]["hit"] and reads == []  # just written: not read again
    _age(entry)
    assert run().summary["reference_cache"]["hit"] and len(reads) == 1 and victim.name in reads[0]  # old: read again, still bad
    assert run().summary["reference_cache"]["hit"] and len(reads) == 1  # the recheck restarted it


# ------------------------------------------------------------------------------- max_images


def _class_folders(root, classes=("field", "forest", "water"), per_class=5):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            write_amplitude_png(root / c / f"{i}.png", rng.random((16, 16)).astype(np.float32))
    return root


def test_max_images_is_a_seeded_sample_stratified_by_label(tmp_path):
    from sar_ray.evaluate import list_images

    root = _class_folders(tmp_path / "ref")
    pick = lambda seed: list_images(root, "reference", 6, seed=seed)[0]  # noqa: E731
    items = pick(0)
    assert Counter(it.label for it in items) == {"field": 2, "forest": 2, "water": 2}
    assert [it.index for it in items] == list(range(6))
    assert [it.name for it in pick(0)] == [it.name for it in items]
    assert {it.name for it in pick(1)} != {it.name for it in items}
    assert len(list_images(root, "reference", None)[0]) == 15


def test_stratified_quotas_keep_every_class_while_they_fit():
    from sar_ray.evaluate import _quotas

    assert _quotas([10, 10, 10], 6) == [2, 2, 2]
    assert _quotas([100, 1, 1], 6) == [4, 1, 1]  # rare classes keep one image
    assert _quotas([100, 1, 1], 2) == [2, 0, 0]  # fewer images than classes: proportional
    assert sum(_quotas([7, 3, 11, 2], 9)) == 9
