"""Stage 2 on the shared trainer: token shards, training, text dropout, tokenizer checks, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parti.config import validate_parti
from parti.data.shards import iter_raw_samples
from parti.data.transforms import ImageDecoder
from parti.models.loading import load_image_tokenizer
from parti.training.stage2 import PartiTask, top1_hits
from parti.training.trainer import Trainer, start_run
from tests.conftest import compose_config, record_losses, tiny_parti_overrides


def build(shapes_dir, token_dir, tokenizer, run_dir, steps=6, extra=()):
    overrides = tiny_parti_overrides(shapes_dir, token_dir, tokenizer, run_dir, steps)
    cfg = compose_config("train_parti", overrides + list(extra))
    run = start_run(cfg, validate_parti)
    task = PartiTask(run)
    return Trainer(run, task), task


def test_token_shards_hold_the_tokenizer_codes_of_every_image(shapes_dir, token_dir, tiny_tokenizer):
    tokenizer = load_image_tokenizer(tiny_tokenizer)
    decode = ImageDecoder(32, train=False)
    images = {s["__key__"]: s for s in iter_raw_samples(f"{shapes_dir}/eval-00000.tar")}
    tokens = list(iter_raw_samples(f"{token_dir}/eval-00000.tar"))
    assert len(tokens) == len(images) == 32
    for sample in tokens[:8]:
        stored = np.load(__import__("io").BytesIO(sample["tokens.npy"]))
        assert stored.dtype == np.int16 and stored.shape == (16,)
        image = decode(images[sample["__key__"]], np.random.default_rng(0))["image"]
        expected = tokenizer.encode(image[None]).flatten()
        assert torch.equal(torch.from_numpy(stored.astype(np.int64)), expected)
        assert sample["txt"] == images[sample["__key__"]]["txt"]
        assert sample["json"] == images[sample["__key__"]]["json"]


def test_tokenize_is_resumable(shapes_dir, tiny_tokenizer, tmp_path):
    from parti.data.tokenize import main as tokenize

    args = ["--shards", f"{shapes_dir}/train-{{00000..00001}}.tar", "--tokenizer",
            str(tiny_tokenizer), "--out", str(tmp_path)]
    assert tokenize(args)["written"] == 2
    (tmp_path / "train-00001.tar").unlink()
    assert tokenize(args) == {"written": 1, "kept": 1, "samples": 64}


def test_a_few_steps_lower_the_loss(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    trainer, task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path, steps=40,
                          extra=["trainer.log_every=1", "model.text_dropout=0.0"])
    losses = record_losses(task, "train/loss")
    metrics = trainer.fit()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert {"eval/loss_true_caption", "eval/loss_shuffled_caption",
            "eval/loss_empty_caption"} <= set(metrics)


def test_encode_on_the_fly_trains_from_image_shards(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    trainer, task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path, steps=2,
                          extra=["data.encode_on_the_fly=true", "data.token_train_shards="])
    batch = next(iter(task.train_loader(None)))
    assert "image" in batch and "tokens" not in batch
    assert task._tokens(batch).shape == (8, 16)
    assert trainer.fit()["eval/loss_true_caption"] > 0


def test_text_dropout_rate(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    _, task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path,
                    extra=["model.text_dropout=0.25"])
    dropped = task._drop_captions(["a red circle"] * 20000)
    rate = sum(c == "" for c in dropped) / len(dropped)
    assert abs(rate - 0.25) < 0.015
    assert set(dropped) == {"", "a red circle"}


def test_resumed_run_ends_with_the_same_weights(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    extra = ["model.dropout=0.1", "model.text_dropout=0.3", "trainer.ckpt_every=2"]
    straight, straight_task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path / "a", 6, extra)
    straight.fit()
    first, _ = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path / "b", 6, extra)
    first.cfg.trainer.steps = 3
    first.fit()
    second, second_task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path / "b", 6, extra)
    assert second.resume().name == "step-0000003"
    second.fit()
    a = straight_task.model.state_dict()
    b = second_task.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override,message", [
    ("model.codebook_size=128", "model.codebook_size 128 differs from the image tokenizer's codebook 64"),
    ("model.image_grid=8", "model.image_grid 8 differs from the image tokenizer's grid 4"),
    ("model.vocab_size=16", "smaller than the text tokenizer's vocabulary"),
])
def test_model_must_match_its_tokenizers(shapes_dir, token_dir, tiny_tokenizer, tmp_path, override,
                                         message):
    with pytest.raises(ValueError, match=message):
        build(shapes_dir, token_dir, tiny_tokenizer, tmp_path, extra=[override])


def test_missing_tokenizer_says_how_to_make_one(shapes_dir, token_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="Train a tokenizer first"):
        build(shapes_dir, token_dir, tmp_path / "nothing", tmp_path)


def test_adafactor_with_the_parti_schedule_trains(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    trainer, task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path, steps=6,
                          extra=["optim=adafactor", "optim.warmup_steps=2", "optim.decay_start=3"])
    assert type(task.units["model"].optimizer).__name__ == "Adafactor"
    lrs = record_losses(task, "train/lr")
    trainer.fit()
    peak = trainer.cfg.lr
    # Warm-up over 2 steps, flat until decay_start, then exponential decay reaching 0.025 x peak
    # after the last step.
    expected = [0.5, 1, 1, 1, 0.025 ** (1 / 3), 0.025 ** (2 / 3)]
    assert lrs == pytest.approx([peak * f for f in expected])


def test_sample_py_generates_and_scores(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    # multi-query attention here: its export reloads with its config (the others are multi-head)
    trainer, task = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path / "run", steps=2,
                          extra=["model.kv_heads=1"])
    trainer.fit()
    export = tmp_path / "run" / "export"
    trainer.export(export)
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square at the top left\n")
    done = subprocess.run(
        [sys.executable, "sample.py", f"ckpt={export}", f"prompts_file={tmp_path}/prompts.txt",
         "samples_per_prompt=2", "candidates=2", "top_p=0.9", "batch_size=3",
         f"out={tmp_path}/samples"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert written == ["000_a_red_circle_0.png", "000_a_red_circle_1.png",
                       "001_a_blue_square_at_the_top_left_0.png",
                       "001_a_blue_square_at_the_top_left_1.png", "grid.png"]
    assert "shapes judge" in done.stdout and "color=" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["prompts=[]"], "no prompts to sample: prompts is empty"),
    (["guidance=-1"], "config error: guidance: -1.0 must be >= 0"),
    (["temperature=0"], "config error: temperature: 0.0 must be > 0"),
    (["top_k=-2"], "config error: top_k: -2 must be >= 0"),
    (["top_p=1.5"], "config error: top_p: 1.5 must be in"),
    (["compile=maybe"], "config error: compile: 'maybe' must be true or false"),
    (["compile_mode=reduce-overhead"],
     "config error: compile_mode: 'reduce-overhead' must be one of default, max-autotune"),
    (["ckpt=/nowhere"], "/nowhere does not exist"),
])
def test_sample_py_names_each_bad_input(args, message, tmp_path, monkeypatch, capsys):
    # the command as `python sample.py` runs it, in this process (a process each: ~10 s of imports)
    import runpy
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent.parent / "sample.py")
    monkeypatch.setattr(sys, "argv", [script, *args, f"out={tmp_path}"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(script, run_name="__main__")
    assert exited.value.code != 0
    assert message in capsys.readouterr().err


def test_sample_py_exits_non_zero_naming_a_bad_input(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "sample.py", "ckpt=/nowhere", f"out={tmp_path}"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "/nowhere does not exist" in done.stderr, done.stderr[-2000:]


def test_a_tokenizer_is_not_a_stage2_checkpoint(tiny_tokenizer):
    from parti.models.loading import load_parti

    with pytest.raises(ValueError, match="holds a 'vitvqgan' model, not a parti model"):
        load_parti(tiny_tokenizer)


def test_tokenizer_evaluation_command(shapes_dir, tiny_tokenizer, capsys):
    from parti.eval.tokenizer import main as evaluate_tokenizer

    metrics = evaluate_tokenizer([f"ckpt={tiny_tokenizer}", f"shards={shapes_dir}/eval-00000.tar",
                                  "samples=16", "batch_size=8"])
    assert {"psnr", "lpips", "codebook_usage", "codebook_perplexity", "judge_all"} <= set(metrics)
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["psnr"] > 5
    assert "on 16 images" in capsys.readouterr().out


def test_top1_hits_equal_argmax_accuracy():
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 1024)
    tokens = torch.randint(1024, (4, 16))
    tokens[:, ::2] = logits[:, ::2].argmax(-1)  # half the positions predicted right
    expected = (logits.argmax(-1) == tokens).float()
    assert torch.equal(top1_hits(logits, tokens), expected)
    assert expected.mean().item() >= 0.5
