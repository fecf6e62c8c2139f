"""Natural-image tiny bases (`tiny-sdxl-natural`): built once from skimage's photographs,
cached, read back through `load_components` exactly as a downloaded checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from sar_ray import natural
from sar_ray.config import ModelConfig
from sar_ray.models import build_tiny, load_components

# A short recipe (seconds, not minutes): enough for the VAE to beat its random self.
SHORT = natural.Recipe(resolution=32, vae_steps=150, vae_lr=2e-3, unet_steps=4, batch_size=4)


@pytest.fixture
def short(tmp_path, monkeypatch):
    monkeypatch.setenv("SAR_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(natural, "DEFAULT", SHORT)
    return tmp_path / "cache"


def _recon_l1(vae, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean())


def test_natural_base_builds_once_caches_and_loads_like_a_checkpoint(short, monkeypatch):
    c = load_components(ModelConfig(pretrained="tiny-sdxl-natural"))
    path = natural.cached_path("tiny-sdxl-natural", SHORT)
    assert path.parent == short / "models" and (path / "model_index.json").is_file()
    info = json.loads((path / "sar_ray_natural.json").read_text())
    assert info["base"] == "tiny-sdxl" and info["recipe"]["vae_steps"] == SHORT.vae_steps
    assert info["build_seconds"] > 0
    # The latents are scaled to unit variance, as SD's 0.18215 / 0.13025 were found.
    assert c.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    assert c.vae.config.scaling_factor != build_tiny("sdxl").vae.config.scaling_factor
    # It was trained with v-prediction and says so: the trial's loss and the sampler read it
    # from the saved scheduler config, as from SD 2.x's.
    assert info["prediction_type"] == "v_prediction"
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    assert build_tiny("sdxl").noise_scheduler.config.prediction_type == "epsilon"  # the random twin mirrors SDXL
    assert (c.kind, c.family, len(c.text_encoders)) == ("sdxl", "sdxl", 2)
    assert c.unet.config.addition_embed_type == "text_time"

    # The VAE learned to reconstruct photographs: below the random one's error on crops it never
    # saw (another seed): 0.74x after these 150 steps (0.59x for the default recipe, trained at 64 px).
    x, _ = natural._Crops(natural._photos(32), 32, seed=123)(8)
    random_vae = build_tiny("sdxl").vae.eval()
    assert _recon_l1(c.vae, x) < 0.9 * _recon_l1(random_vae, x)

    # Cached: a second load never trains again.
    monkeypatch.setattr(natural, "build", lambda *a, **k: pytest.fail("rebuilt a cached natural base"))
    again = load_components(ModelConfig(pretrained="tiny-sdxl-natural"))
    for (n, a), b in zip(c.vae.state_dict().items(), again.vae.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_half_written_natural_base_is_rebuilt_never_read(short):
    path = natural.cached_path("tiny-sd15-natural", SHORT)
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")  # a build killed before its marker
    assert natural.ensure("tiny-sd15-natural") == path
    assert (path / "sar_ray_natural.json").is_file()
    c = load_components(ModelConfig(pretrained="tiny-sd15-natural"))
    assert (c.kind, c.family, len(c.text_encoders)) == ("sd", "sd15", 1)


def test_another_recipe_gets_its_own_folder_and_unknown_names_are_refused():
    assert natural.cached_path("tiny-sdxl-natural").name == f"tiny-sdxl-natural-v{natural.RECIPE_VERSION}"
    assert natural.cached_path("tiny-sdxl-natural", SHORT) != natural.cached_path("tiny-sdxl-natural")
    assert not natural.is_natural("tiny-sd3-natural") and not natural.is_natural("tiny-sdxl")
    with pytest.raises(ValueError, match="valid: tiny-sd15-natural"):
        natural.base_of("tiny-sd3-natural")
