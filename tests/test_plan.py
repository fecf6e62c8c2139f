"""plan.py (`sar-ray validate --plan`): the counts are those of the real model, the bytes follow
the documented rules, and a study whose lower bound exceeds its GPU memory is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sar_ray import models, plan, strategies
from sar_ray.cli import main
from sar_ray.config import ConfigError, ModelConfig, load

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "sweeps/paper.yaml")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The public SDXL base sizes (what the model cards and diffusers report).
SDXL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny SD and SDXL pipelines on disk: a local folder the plan reads its configs from."""
    return {kind: models.save_pipeline(models.build_tiny(kind), tmp_path_factory.mktemp(f"plan-{kind}"))
            for kind in ("sd", "sdxl")}


def trial(pretrained, *sets: str):
    """A trial from dotted overrides, every component frozen unless a set says otherwise."""
    return load(None, [f"model.pretrained={pretrained}", "strategy.unet.mode=frozen", *sets]).trial()


# --------------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------------


def test_sdxl_is_built_on_the_meta_device_with_the_public_sizes():
    arch = plan.architecture("stabilityai/stable-diffusion-xl-base-1.0")
    assert arch.kind == "sdxl"
    for name, module in arch.modules.items():
        assert all(p.is_meta for p in module.parameters()), f"{name} holds real memory"
        assert sum(p.numel() for p in module.parameters()) == SDXL_PARAMS[name]


CASES = {
    "sdxl": [
        ["strategy.unet.mode=full"],
        ["strategy.unet.mode=lora", "strategy.unet.rank=8", "strategy.text_encoder.mode=lora", "strategy.token=learn"],
        ["strategy.text_encoder.mode=full", "strategy.token=learn"],
        ["strategy.text_encoder.mode=full", "strategy.text_encoder_2.mode=lora", "strategy.text_encoder_2.rank=2"],
        ["strategy.vae.mode=full"],
        ["strategy.vae.mode=lora", "strategy.vae.rank=3", "strategy.unet.mode=lora"],
    ],
    "sd": [
        ["strategy.unet.mode=full", "strategy.text_encoder.mode=lora", "strategy.vae.mode=lora",
         "strategy.token=learn"],
        ["strategy.text_encoder.mode=full", "strategy.token=learn", "strategy.vae.mode=full"],
    ],
}


@pytest.mark.parametrize("kind,sets", [(k, s) for k, cases in CASES.items() for s in cases],
                         ids=lambda v: v if isinstance(v, str) else " ".join(x.split(".", 1)[1] for x in v))
def test_counts_equal_what_apply_trains_on_the_real_model(kind, sets, saved):
    """Trainable and frozen counts per component equal those of the real tiny model after
    `strategies.apply` (peft's add_adapter for LoRA, the VAE decoder only, SDXL's unused last
    layer left out, the learned token's rows)."""
    cfg = trial(saved[kind], *sets)
    planned = {c.name: c for c in plan.plan_trial(cfg, activations=False).components}

    c = models.build_tiny(kind)
    applied = strategies.apply(c, cfg.strategy, cfg.train.lr)
    for name, module in c.modules().items():
        real_trainable = sum(p.numel() for k, p in applied.named_params.items() if k.split(".", 1)[0] == name)
        real_total = sum(p.numel() for p in module.parameters())
        assert planned[name].trainable == real_trainable, name
        assert planned[name].trainable + planned[name].frozen == real_total, name


def test_lora_size_is_what_peft_adds_to_linear_and_conv_layers():
    torch.manual_seed(0)
    layers = {"to_q": torch.nn.Linear(48, 24), "conv1": torch.nn.Conv2d(16, 8, 3, padding=1)}
    model = torch.nn.ModuleDict(layers)
    expected = sum(plan.lora_size(m, 4) for m in layers.values())
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, target_modules=list(layers)), model)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == expected


# --------------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------------


def test_bytes_follow_dtypes_optimizer_workers_and_ema():
    comps = [plan.ComponentPlan("unet", "full", 1000, 0, 2), plan.ComponentPlan("text_encoder", "frozen", 0, 500, 2),
             plan.ComponentPlan("vae", "frozen", 0, 100, 4)]
    cfg = trial("tiny-sd", "strategy.unet.mode=full", "scaling.num_workers=4")
    assert plan.memory_bytes(comps, cfg) == {
        "weights": 4 * 1000 + 2 * 500 + 4 * 100, "grads": 4000, "optimizer": 8000, "sync": 4000, "ema": 0}
    cfg = trial("tiny-sd", "strategy.unet.mode=full", "scaling.num_workers=1", "train.optimizer=adamw8bit",
                "train.ema.enabled=true")
    got = plan.memory_bytes(comps, cfg)
    assert (got["optimizer"], got["sync"], got["ema"]) == (2000, 0, 4000)


def test_paper_full_unet_and_text_encoders_lower_bound():
    """SDXL, bf16, 4 workers, AdamW: 20 bytes per trainable parameter (weight, gradient, two
    moments, sync buffer); a fully tuned encoder's unused layer stays fp32 with it (strategies.place);
    the VAE in fp32."""
    cfg = load(PAPER).trial(**{"strategy.text_encoder": {"mode": "full"}, "strategy.token": "none"})
    p = plan.plan_trial(cfg, activations=False)
    unused = 7_087_872 + 1_536  # text_encoder's last layer and final norm: never trained on SDXL
    trainable = SDXL_PARAMS["unet"] + SDXL_PARAMS["text_encoder"] - unused + SDXL_PARAMS["text_encoder_2"]
    assert p.trainable == trainable
    assert p.lower_bound == 20 * trainable + 4 * unused + 4 * SDXL_PARAMS["vae"]


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


def test_activation_estimate_equals_what_autograd_saves_on_the_real_model(saved):
    cfg = trial(saved["sdxl"], "strategy.unet.mode=full", "train.batch_size=2", "data.resolution=64",
                "train.mixed_precision=no", "train.gradient_checkpointing=false")
    estimate = plan.activation_bytes(plan.architecture(cfg.model.pretrained), cfg)

    unet = models.build_tiny("sdxl").unet
    counter = plan._SavedTensors(None, set())
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.full((2, 6), 64.0)}
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 64), added_cond_kwargs=added)
    assert estimate == pytest.approx(counter.total(checkpointing=False), rel=0.1)


def test_activations_shrink_with_checkpointing_and_vanish_when_nothing_needs_a_gradient(saved):
    sets = ("strategy.unet.mode=full", "train.batch_size=2", "data.resolution=64", "train.mixed_precision=bf16")

    def estimate(*more):
        cfg = trial(saved["sdxl"], *sets, *more)
        return plan.activation_bytes(plan.architecture(cfg.model.pretrained), cfg)

    full = estimate("train.gradient_checkpointing=false")
    assert 0 < estimate("train.gradient_checkpointing=true") < full
    assert estimate("train.gradient_checkpointing=false", "train.batch_size=4") > full
    # Only the VAE trains: the UNet and text encoders keep nothing for backward.
    only_vae = trial(saved["sdxl"], "strategy.vae.mode=full", "data.resolution=64")
    arch = plan.architecture(only_vae.model.pretrained)
    assert plan._unet_activations(arch, only_vae, text_grad=False) == 0
    assert plan.activation_bytes(arch, only_vae) == plan._vae_activations(arch, only_vae) > 0


# --------------------------------------------------------------------------------------------
# which configs
# --------------------------------------------------------------------------------------------


def _fake_hub_cache(root: Path, repo_id: str, folder: Path) -> None:
    """The layout huggingface_hub writes: refs/main -> a snapshot folder holding the files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    for f in ["model_index.json", *plan.CONFIG_FILES.values()]:
        if (folder / f).is_file():
            (repo / "snapshots" / "abc123" / f).parent.mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / "abc123" / f).write_text((folder / f).read_text())


def test_hub_id_uses_its_cached_configs_else_the_shipped_family(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "someone/my-sdxl", saved["sdxl"])
    configs, note = plan.resolve_configs(ModelConfig(pretrained="someone/my-sdxl"))
    assert "local Hugging Face cache" in note
    tiny_unet = json.loads((saved["sdxl"] / "unet/config.json").read_text())
    assert configs["unet"]["block_out_channels"] == tiny_unet["block_out_channels"]

    for repo, family in [("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
                         ("stabilityai/stable-diffusion-2-1", "sd2"),
                         ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
                         ("runwayml/stable-diffusion-v1-5", "sd15")]:
        configs, note = plan.resolve_configs(ModelConfig(pretrained=repo))
        assert f"public {family} configs" in note and configs == plan.shipped_configs(family)


def test_tiny_models_are_planned_at_their_real_family_size():
    configs, note = plan.resolve_configs(ModelConfig(pretrained="tiny-sd2"))
    assert configs == plan.shipped_configs("sd2") and "real sd2" in note


def test_local_folder_without_configs_is_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="no model_index.json"):
        plan.resolve_configs(ModelConfig(pretrained=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# refusal and the command
# --------------------------------------------------------------------------------------------


def _grid_study(tmp_path, budget: str) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(f"""
model: {{pretrained: tiny-sd}}          # planned as SD 1.5: a full UNet needs ~17 GB
scaling: {{num_workers: 2{budget}}}
search:
  algorithm: grid
  space:
    strategy.unet.mode: {{grid: [lora, full]}}
""")
    return p


def test_check_memory_names_only_the_points_over_budget(tmp_path):
    study = load(_grid_study(tmp_path, ", gpu_memory_gb: 10"))
    with pytest.raises(ConfigError) as e:
        plan.check_memory(study)
    message = str(e.value)
    assert "gpu_memory_gb=10" in message and "strategy.unet.mode=full" in message
    assert "strategy.unet.mode=lora" not in message and "base trial" not in message
    assert "\n" not in message


def test_optuna_space_plans_the_product_of_its_categorical_axes(tmp_path):
    p = tmp_path / "optuna.yaml"
    p.write_text("""
search:
  algorithm: optuna
  space:
    strategy.unet.mode: {choice: [lora, full]}
    strategy.unet.rank: {grid: [4, 16]}
    train.lr: {loguniform: [1.0e-5, 1.0e-3]}
""")
    study = load(p)
    points = plan.study_points(study)
    # base + lora x 2 ranks + full (the rank only where the UNet is LoRA); lr keeps its base value
    assert [label for label, _ in points][1:] == [
        "strategy.unet.mode=lora strategy.unet.rank=4", "strategy.unet.mode=lora strategy.unet.rank=16",
        "strategy.unet.mode=full"]
    assert {cfg.train.lr for _, cfg in points} == {study.train.lr}


def test_check_memory_is_a_no_op_without_a_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "architecture", lambda *a: pytest.fail("built a model without a budget"))
    plan.check_memory(load(_grid_study(tmp_path, "")))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_plan_of_the_paper_study_prints_every_strategy(capsys):
    code, out, err = run(capsys, "validate", PAPER, "--plan")
    assert code == 0, err
    assert "lower bound" in out and "activations" in out
    study = load(PAPER)
    slugs = {cfg.strategy.slug for _, cfg in plan.study_points(study)}
    assert len(slugs) == 53
    assert all(slug in out for slug in slugs)
    # The paper's claim: full UNet + full text encoders fit 80 GB (lower bound and estimate).
    row = next(line for line in out.splitlines() if "unet-full_te-full_vae-frozen " in line)
    lower, total = (float(x) for x in row.strip("│ ").split("│")[-2:])
    assert lower < total < 80 == study.scaling.gpu_memory_gb
    # A tuned VAE decoder at 1024 px beside a full UNet: over 80 GB by the estimate, a warning only.
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert any(line.startswith("warning: unet-full_te-full_vae-full:") for line in warned)
    assert not any("vae-frozen" in line for line in warned)


def test_validate_plan_refuses_a_budget_below_a_lower_bound_in_one_line(capsys):
    code, out, err = run(capsys, "validate", PAPER, "--plan", "--set", "scaling.gpu_memory_gb=40")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "unet-full_te-full_vae-frozen needs" in err and "strategy.text_encoder={mode: full" in err
    assert "unet-lora32" not in err
    assert "lower bound" in out  # the table still shows where the memory goes
