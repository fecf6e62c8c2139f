"""models.py: real CLIP tokenizer, deterministic tiny models, the save -> load round trip that a
real model also takes, text conditioning as diffusers computes it, and sampling pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler
from open_clip.tokenizer import SimpleTokenizer

from sar_ray import models
from sar_ray.config import ModelConfig

CAPTIONS = ["<SAR> image of open water with a ship", "radar image of agricultural fields, X-band"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny():
    return {kind: models.build_tiny(kind) for kind in ("sd", "sdxl")}


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    out = {}
    for kind, c in tiny.items():
        out[kind] = models.save_pipeline(c, tmp_path_factory.mktemp(f"tiny-{kind}"))
    return out


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_is_the_real_clip_bpe():
    tok = models.clip_tokenizer()
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok("radar").input_ids == [49406, 9672, 49407]
    # Same ids as open_clip's reference implementation of OpenAI's tokenizer.
    reference = SimpleTokenizer()
    for text in ["radar image of a ship", "speckle over agricultural fields", "sea ice, X-band 3m"]:
        assert tok(text).input_ids[1:-1] == reference.encode(text)


def test_sdxl_second_tokenizer_pads_with_exclamation_mark(tiny):
    tok2 = tiny["sdxl"].tokenizers[1]
    assert tok2.pad_token == "!"
    ids = tok2("radar", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 9672, 49407, 0] and ids[-1] == 0
    ids1 = tiny["sdxl"].tokenizers[0]("radar", padding="max_length", max_length=77).input_ids
    assert ids1[-1] == 49407  # the first tokenizer pads with <|endoftext|>, like the real SDXL


# -- tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_tiny_build_is_deterministic(kind, tiny):
    again = models.build_tiny(f"tiny-{kind}", seed=0)
    for name, m in tiny[kind].modules().items():
        _assert_same_weights(m, again.modules()[name])
    other = models.build_tiny(kind, seed=1)
    assert not torch.equal(
        other.unet.conv_in.weight, tiny[kind].unet.conv_in.weight
    ), "a different seed must give different weights"


def test_tiny_shapes_match_real_sd_conventions(tiny):
    sd, xl = tiny["sd"], tiny["sdxl"]
    assert sd.kind == "sd" and xl.kind == "sdxl"
    assert [type(t).__name__ for t in xl.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert sd.vae.config.scaling_factor == pytest.approx(0.18215)
    assert xl.vae.config.scaling_factor == pytest.approx(0.13025)
    with torch.no_grad():
        lat = sd.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert lat.shape == (1, 4, 8, 8)  # vae_scale_factor 8, as in real SD
    assert xl.unet.config.cross_attention_dim == 64  # 32 + 32: both encoders concatenated
    assert xl.unet.config.projection_class_embeddings_input_dim == 6 * 8 + 32
    assert xl.noise_scheduler.config.prediction_type == "epsilon"
    assert xl.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert set(xl.modules()) == {"unet", "vae", "text_encoder", "text_encoder_2"}


# -- save -> load round trip --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_pipeline_loads_back_identically(kind, tiny, saved):
    path = saved[kind]
    files = [p for p in path.rglob("*") if p.is_file()]
    assert files and all(p.suffix in {".safetensors", ".json", ".txt"} for p in files), files
    index = json.loads((path / "model_index.json").read_text())
    assert models.detect_kind(index) == kind

    c = models.load_components(ModelConfig(pretrained=str(path)))
    assert c.kind == kind and c.source == str(path)
    for name, m in tiny[kind].modules().items():
        _assert_same_weights(m, c.modules()[name])
    for a, b in zip(tiny[kind].tokenizers, c.tokenizers):
        assert a(CAPTIONS, padding="max_length").input_ids == b(CAPTIONS, padding="max_length").input_ids
        assert b.pad_token == a.pad_token
    assert torch.equal(c.noise_scheduler.betas, tiny[kind].noise_scheduler.betas)
    assert c.noise_scheduler.config.num_train_timesteps == 1000
    assert not any(m.training for m in c.modules().values())


def test_load_components_dtypes_and_prediction_type(saved):
    cfg = ModelConfig(pretrained=str(saved["sd"]), weight_dtype="bf16", prediction_type="v_prediction")
    c = models.load_components(cfg, keep_fp32={"unet"})
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    assert c.unet.dtype == torch.float32  # tuned fully: never rounded through bf16
    assert c.text_encoders[0].dtype == torch.bfloat16
    assert c.vae.dtype == torch.float32  # vae_force_upcast
    c = models.load_components(ModelConfig(pretrained="tiny-sdxl", weight_dtype="fp16", vae_force_upcast=False))
    assert {m.dtype for m in c.modules().values()} == {torch.float16}


def test_load_components_rejects_a_folder_without_pipeline(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        models.load_components(ModelConfig(pretrained=str(tmp_path)))


def test_load_components_never_downloads_an_unknown_hub_id():
    # conftest sets HF_HUB_OFFLINE=1: an id that is not cached fails fast with a clear message.
    with pytest.raises(ValueError, match="model.pretrained='someone/not-cached-model'"):
        models.load_components(ModelConfig(pretrained="someone/not-cached-model"))


def test_detect_kind():
    assert models.detect_kind({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}) == "sd"
    assert models.detect_kind({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["x", "y"], "text_encoder": ["a", "b"]}) == "sdxl"
    with pytest.raises(ValueError, match="refiner"):
        models.detect_kind({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None], "text_encoder_2": ["a", "b"]})


# -- text conditioning --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_encode_text_equals_the_pipeline_conditioning(kind, tiny):
    c = tiny[kind]
    emb, pooled = models.encode_text(c, CAPTIONS, "cpu")
    pipe = models.assemble_pipeline(c)
    with torch.no_grad():
        ref = pipe.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    if kind == "sd":
        assert emb.shape == (2, 77, 32) and pooled is None
    else:
        assert emb.shape == (2, 77, 64) and pooled.shape == (2, 32)
        assert torch.equal(pooled, ref[2])
    assert torch.equal(emb, ref[0])


def test_encode_text_lets_gradients_reach_the_encoders(tiny):
    c = models.build_tiny("sdxl")
    emb, pooled = models.encode_text(c, CAPTIONS, "cpu")
    (emb.square().mean() + pooled.square().mean()).backward()
    for te in c.text_encoders:
        assert te.get_input_embeddings().weight.grad is not None


# -- pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,scheduler,cls",
    [("sd", "dpm++", DPMSolverMultistepScheduler), ("sdxl", "euler", EulerDiscreteScheduler), ("sdxl", "ddim", DDIMScheduler)],
)
def test_assemble_pipeline_generates_with_live_modules(kind, scheduler, cls, tiny):
    c = tiny[kind]
    pipe = models.assemble_pipeline(c, scheduler)
    assert pipe.unet is c.unet and pipe.vae is c.vae and pipe.text_encoder is c.text_encoders[0]
    assert isinstance(pipe.scheduler, cls)
    if scheduler == "dpm++":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    g = torch.Generator().manual_seed(0)
    image = pipe("<SAR> a ship", num_inference_steps=2, height=64, width=64, output_type="np", generator=g).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    g = torch.Generator().manual_seed(0)
    again = pipe("<SAR> a ship", num_inference_steps=2, height=64, width=64, output_type="np", generator=g).images
    np.testing.assert_array_equal(image, again)


def test_assemble_pipeline_rejects_unknown_scheduler(tiny):
    with pytest.raises(ValueError, match="dpm\\+\\+, euler, ddim"):
        models.assemble_pipeline(tiny["sd"], "pndm")


# -- the tiny models mirror the public configs ---------------------------------------------------


@pytest.mark.parametrize("family", models.FAMILIES)
def test_tiny_models_keep_every_public_config_key_but_sizes(family):
    c = models.build_tiny(family)
    sizes = models.TINY_SIZES[family]
    for name, module in c.modules().items():
        public = models.public_config(family, name)
        built = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        for key, value in public.items():
            if key in sizes[name]:
                continue
            got = built.get(key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{family} {name}.{key}"
    sched = models.public_config(family, "scheduler")
    assert c.noise_scheduler.config.prediction_type == sched["prediction_type"]
    assert c.noise_scheduler.config.beta_end == sched["beta_end"]
    pads = [models.public_config(family, t)["pad_token"] for t in c.tokenizer_names]
    assert [t.pad_token for t in c.tokenizers] == pads
    assert c.force_zeros_for_empty_prompt == (family == "sdxl")
    assert c.vae.config.force_upcast and c.vae.config.scaling_factor == models.public_config(family, "vae")["scaling_factor"]


def test_tiny_sd2_is_v_prediction_and_loads_back_as_sd2(tmp_path):
    path = models.save_pipeline(models.build_tiny("sd2"), tmp_path / "sd2")
    c = models.load_components(ModelConfig(pretrained=str(path)))
    assert (c.kind, c.family, c.noise_scheduler.config.prediction_type) == ("sd", "sd2", "v_prediction")
    assert models.load_components(ModelConfig(pretrained="tiny-sd")).family == "sd15"


def _pooled_of_two_captions(c) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        _, pooled = models.encode_text(c, ["<SAR> image of open water", "<SAR> image of a dense forest"], "cpu")
    return pooled[0], pooled[1]


def test_learned_token_keeps_sdxl_pooled_embedding_caption_specific():
    """The public SDXL text_encoder_2 says eos_token_id 2: transformers pools at argmax(ids),
    which is the added <SAR> (the largest id), so every caption pooled the same."""
    from sar_ray.config import load
    from sar_ray.strategies import apply

    s = load(None, ["strategy.token=learn", "strategy.unet.mode=frozen"]).strategy
    raw = models.build_tiny("sdxl")  # as the hub configs are: the trap
    assert [te.config.eos_token_id for te in raw.text_encoders] == [2, 2]
    apply(raw, s, default_lr=1e-4)
    a, b = _pooled_of_two_captions(raw)
    assert torch.equal(a, b)

    c = models.load_components(ModelConfig(pretrained="tiny-sdxl"))  # what training loads
    apply(c, s, default_lr=1e-4)
    a, b = _pooled_of_two_captions(c)
    assert (a - b).abs().max() > 1e-4  # training: caption-specific
    pipe = models.assemble_pipeline(c)  # the project's sampling
    with torch.no_grad():
        p1 = pipe.encode_prompt("<SAR> image of open water", device="cpu", do_classifier_free_guidance=False)[2]
        p2 = pipe.encode_prompt("<SAR> image of a dense forest", device="cpu", do_classifier_free_guidance=False)[2]
    assert (p1 - p2).abs().max() > 1e-4 and torch.allclose(p1[0], a, atol=1e-6)
