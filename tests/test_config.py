"""Config tree: every group composes against its schema; bad values fail with the key named."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from parti.config import to_container, validate_parti, validate_vqgan
from parti.models.parti import Parti
from parti.models.vitvqgan import VitVQGAN, count_block_params
from tests.conftest import CONF_DIR, compose_config

CONF = Path(CONF_DIR)
VQGAN_MODELS = sorted(p.stem for p in (CONF / "model").glob("vitvqgan_*.yaml"))
PARTI_MODELS = sorted(p.stem for p in (CONF / "model").glob("parti_*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# Blocks-only parameters per stack implied by the ViT-VQGAN shapes (12 d^2 per block), and Parti's
# non-embedding counts (12 d^2 per encoder layer, 16 d^2 per decoder layer): papers.md.
VQGAN_BLOCK_PARAMS = {"vitvqgan_small": 8 * 12 * 512**2, "vitvqgan_base": 12 * 12 * 768**2,
                      "vitvqgan_large": 32 * 12 * 1280**2}
PARTI_PARAMS = {"parti_350m": 352e6, "parti_750m": 755e6, "parti_3b": 3.02e9, "parti_20b": 20.4e9}


def test_lr_is_top_level_and_read_by_the_optimizer():
    for name in ("train_vqgan", "train_parti"):
        cfg = compose_config(name, ["lr=3e-4"])
        assert cfg.optim.lr == 3e-4


@pytest.mark.parametrize("model", VQGAN_MODELS)
def test_every_vitvqgan_config_instantiates_with_the_paper_shape(model):
    cfg = compose_config("train_vqgan", [f"model={model}", f"data.image_size={256 if model != 'vitvqgan_tiny' else 64}"])
    validate_vqgan(cfg)
    model_cfg = OmegaConf.to_object(cfg.model)
    with torch.device("meta"):
        net = VitVQGAN(model_cfg)
    assert net.grid == model_cfg.image_size // model_cfg.patch_size
    if model in VQGAN_BLOCK_PARAMS:
        per_stack = count_block_params(model_cfg)
        for stack, count in per_stack.items():
            assert abs(count / VQGAN_BLOCK_PARAMS[model] - 1) < 0.02, (stack, count)
        assert model_cfg.codebook_size == 8192 and model_cfg.code_dim == 32
        assert model_cfg.image_size == 256 and model_cfg.patch_size == 8


@pytest.mark.parametrize("model", PARTI_MODELS)
def test_every_parti_config_instantiates_with_the_paper_size(model):
    cfg = compose_config("train_parti", [f"model={model}"])
    validate_parti(cfg)
    with torch.device("meta"):
        net = Parti(OmegaConf.to_object(cfg.model))
    if model in PARTI_PARAMS:
        assert abs(net.num_params(non_embedding=True) / PARTI_PARAMS[model] - 1) < 0.05
        assert cfg.model.vocab_size == 16000 and cfg.model.text_len == 128
        assert cfg.model.codebook_size == 8192 and cfg.model.image_grid == 32


@pytest.mark.parametrize("group,options", [
    ("optim", ["adam", "adamw", "adafactor", "sgd"]), ("data", ["shapes", "wds"]), ("trainer", ["default"]),
])
@pytest.mark.parametrize("primary", ["train_vqgan", "train_parti"])
def test_every_group_option_composes(primary, group, options):
    for option in options:
        cfg = compose_config(primary, [f"{group}={option}"])
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    primary = "train_parti" if "parti" in experiment else "train_vqgan"
    cfg = compose_config(primary, [f"experiment={experiment}"])
    (validate_parti if primary == "train_parti" else validate_vqgan)(cfg)


def test_parti_model_in_the_stage1_config_is_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_config("train_vqgan", ["model=parti_tiny"])


@pytest.mark.parametrize("override,error", [
    ("trainer.stpes=5", ConfigCompositionException),
    ("trainer.steps=many", ConfigCompositionException),
    ("model.width=3", ConfigCompositionException),
    ("optim.betas=fast", ConfigCompositionException),
])
def test_unknown_keys_and_wrong_types_fail_at_composition(override, error):
    with pytest.raises(error):
        compose_config("train_vqgan", [override])


def test_unknown_key_in_a_structured_node_names_it():
    cfg = compose_config("train_vqgan")
    with pytest.raises((ConfigAttributeError, ConfigKeyError, ValidationError), match="stpes"):
        cfg.trainer.stpes = 5


@pytest.mark.parametrize("primary,overrides,message", [
    ("train_vqgan", ["trainer.global_batch=30", "trainer.micro_batch=8"],
     "global_batch 30 is not a multiple of micro_batch 8 x world_size 1"),
    ("train_vqgan", ["lr=-1e-4"], "lr: -0.0001 must be > 0"),
    ("train_vqgan", ["trainer.precision=fp8"], "trainer.precision"),
    ("train_vqgan", ["optim.schedule=linear"], "optim.schedule"),
    ("train_vqgan", ["model.code_dim=512"], "model.code_dim"),
    ("train_vqgan", ["model.image_size=60", "data.image_size=60"], "model.image_size"),
    ("train_vqgan", ["data.image_size=32"], "data.image_size"),
    ("train_vqgan", ["loss.disc_loss=wasserstein"], "loss.disc_loss"),
    ("train_vqgan", ["data.num_workers=-1"], "data.num_workers"),
    ("train_parti", ["model.heads=3"], "model"),
    ("train_parti", ["model.kv_heads=3"], "model.kv_heads must be null or an integer >= 1 dividing"),
    ("train_parti", ["model.text_dropout=1.5"], "model.text_dropout"),
    ("train_parti", ["tokenizer.ckpt="], "tokenizer.ckpt"),
    ("train_parti", ["data.token_train_shards="], "data.token_train_shards"),
    ("train_parti", ["data.token_eval_shards="], "data.token_eval_shards"),
    ("train_vqgan", ["data=wds", "data.image_size=64", "data.eval_shards=/d/val.tar"],
     "data.train_shards: is empty: stage 1 trains on image shards"),
    ("train_vqgan", ["data=wds", "data.image_size=64", "data.train_shards=/d/0.tar"],
     "data.eval_shards: is empty"),
    ("train_parti", ["data=wds", "data.encode_on_the_fly=true", "data.text_tokenizer=/d/t.model"],
     "data.train_shards: is empty: data.encode_on_the_fly=true encodes image shards"),
    ("train_parti", ["data.generate=true", "data.train_shards="], "data.generate"),
])
def test_impossible_values_fail_with_the_key_named(primary, overrides, message):
    cfg = compose_config(primary, overrides)
    validate = validate_parti if primary == "train_parti" else validate_vqgan
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_stage2_on_token_shards_needs_no_image_shards():
    """The README's stage-2 command on data=wds: token shards and a text model, no image shards."""
    cfg = compose_config("train_parti", [
        "model=parti_350m", "data=wds", "optim=adafactor", "tokenizer.ckpt=/runs/vqgan/export",
        "data.token_train_shards='/data/tokens/{00000..01022}.tar'",
        "data.token_eval_shards=/data/tokens/01023.tar", "data.text_tokenizer=/data/text.model",
        "trainer.steps=450000"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_parti(cfg)
    assert to_container(cfg)["data"]["train_shards"] == ""


def test_a_resume_value_that_is_no_checkpoint_is_rejected_before_any_work(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-0000002").mkdir(parents=True)
    for value, message in [
        ("none", "'none' is neither auto nor never nor a complete checkpoint folder"),
        (tmp_path / "run", "pass run_dir=.* resume=auto"),
        (tmp_path / "run" / "checkpoints" / "step-0000002", "holding COMPLETE"),
    ]:
        cfg = compose_config("train_vqgan", [f"resume={value}"])
        with pytest.raises(ValueError, match=f"config error: resume: .*{message}"):
            validate_vqgan(cfg)
    (tmp_path / "run" / "checkpoints" / "step-0000002" / "COMPLETE").write_text("{}")
    validate_vqgan(compose_config("train_vqgan", [f"resume={tmp_path}/run/checkpoints/step-0000002"]))


@pytest.mark.parametrize("overrides,message", [
    (["optim=adafactor"], "optim.warmup_steps=5000 >= trainer.steps=5000: the whole run is warm-up"),
    (["optim=adafactor", "trainer.steps=50000"], "optim.decay_start=85000 >= trainer.steps=50000"),
])
def test_a_schedule_longer_than_the_run_is_warned_about(overrides, message):
    cfg = compose_config("train_parti", overrides)
    with pytest.warns(UserWarning, match=message):
        validate_parti(cfg)


def test_global_batch_accounts_for_world_size():
    cfg = compose_config("train_vqgan", ["trainer.global_batch=32", "trainer.micro_batch=8"])
    validate_vqgan(cfg, world_size=4)
    with pytest.raises(ValueError, match="micro_batch 8 x world_size 3"):
        validate_vqgan(cfg, world_size=3)
