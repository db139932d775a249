"""The CUDA paths, on a machine with a GPU (skipped without one): bf16 and fp16 training of both
stages, exact resume, the KV-cached and compiled samplers against full passes, and torchrun's
nccl group. Run them alone with `pytest -m gpu`."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from parti.config import validate_parti, validate_vqgan
from parti.sampling import SamplingConfig, row_seed, sample_tokens
from parti.training.stage1 import VQGANTask
from parti.training.stage2 import PartiTask
from parti.training.trainer import Trainer, start_run
from tests.conftest import compose_config, record_losses, tiny_parti_overrides, tiny_vqgan_overrides
from tests.test_launch import run
from tests.test_sampling import greedy, text

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def build_parti(shapes_dir, token_dir, tokenizer, run_dir, steps, extra=()):
    cfg = compose_config("train_parti",
                         tiny_parti_overrides(shapes_dir, token_dir, tokenizer, run_dir, steps)
                         + list(extra))
    run_ = start_run(cfg, validate_parti)
    task = PartiTask(run_)
    return Trainer(run_, task), task


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_stage2_trains_in_mixed_precision_on_the_gpu(shapes_dir, token_dir, tiny_tokenizer,
                                                     tmp_path, precision):
    trainer, task = build_parti(shapes_dir, token_dir, tiny_tokenizer, tmp_path, 40, [
        "trainer.log_every=1", "model.text_dropout=0.0", f"trainer.precision={precision}"])
    assert trainer.run.dist.device.type == "cuda"
    assert trainer.run.precision == ("bf16" if precision == "auto" else "fp16")
    losses = record_losses(task, "train/loss")
    metrics = trainer.fit()
    assert next(task.model.parameters()).is_cuda
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert math.isfinite(metrics["eval/loss_true_caption"])


def test_stage1_trains_in_bf16_with_perceptual_and_gan_terms(shapes_dir, tmp_path):
    cfg = compose_config("train_vqgan", tiny_vqgan_overrides(shapes_dir, tmp_path, steps=6))
    run_ = start_run(cfg, validate_vqgan)
    assert run_.precision == "bf16"
    task = VQGANTask(run_)
    losses = record_losses(task, "train/loss")
    trainer = Trainer(run_, task)
    trainer.fit()
    trainer.export(tmp_path / "export")
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "export").is_dir()


def test_resumed_run_on_the_gpu_ends_with_the_same_weights(shapes_dir, token_dir, tiny_tokenizer,
                                                           tmp_path, monkeypatch):
    # Deterministic kernels, so that two runs of the same steps can be compared to the bit: the
    # dropout masks come from the CUDA generator, whose state the checkpoint must restore.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        extra = ["model.dropout=0.1", "model.text_dropout=0.3", "trainer.ckpt_every=2"]
        straight, straight_task = build_parti(shapes_dir, token_dir, tiny_tokenizer,
                                              tmp_path / "a", 6, extra)
        straight.fit()
        first, _ = build_parti(shapes_dir, token_dir, tiny_tokenizer, tmp_path / "b", 6, extra)
        first.cfg.trainer.steps = 3
        first.fit()
        second, second_task = build_parti(shapes_dir, token_dir, tiny_tokenizer,
                                          tmp_path / "b", 6, extra)
        assert second.resume().name == "step-0000003"
        second.fit()
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = straight_task.model.state_dict(), second_task.model.state_dict()
    differences = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert max(differences.values()) == 0, differences


@pytest.fixture
def exact_fp32(monkeypatch):
    """Plain fp32 matmuls: TF32 rounds the one-row cached products and the full passes apart."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("compile_", [False, True])
def test_cached_sampling_on_the_gpu_is_greedy_decoding_by_full_passes(exact_fp32, compile_):
    from tests.test_parti_model import tiny_model

    model = tiny_model().cuda().eval()
    ids, mask, empty_ids, empty_mask = (t.cuda() for t in text())
    with torch.no_grad():
        expected = greedy(model, ids, mask, empty_ids, empty_mask, guidance=3.0)
    seeds = [row_seed(5, i) for i in range(len(ids))]
    cfg = SamplingConfig(guidance=3.0, top_k=1, compile=compile_)
    tokens = sample_tokens(model, ids, mask, empty_ids, empty_mask, seeds, cfg)
    assert tokens.is_cuda
    assert torch.equal(tokens, expected)


def test_torchrun_on_one_gpu_trains_stage2_and_exports(shapes_dir, token_dir, tiny_tokenizer,
                                                       tmp_path):
    overrides = tiny_parti_overrides(shapes_dir, token_dir, tiny_tokenizer, tmp_path, steps=4)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "train_parti.py", *overrides])
    log = (tmp_path / "train.log").read_text()
    assert "precision bf16" in log and "eval step 4" in log
    assert (tmp_path / "export" / "model.safetensors").is_file()


NCCL_GROUP = """
import sys, torch, torch.distributed as dist
from parti import distributed
device = torch.device("cuda", 0)
dist.init_process_group(distributed.backend_for(device), init_method="file://" + sys.argv[1],
                        rank=0, world_size=1)
assert dist.get_backend(dist.group.WORLD) in ("cpu:gloo,cuda:nccl", "nccl")
means = distributed.reduce_scalars({"a": torch.tensor(2.0, device=device), "b": 3.0}, device)
assert means == {"a": 2.0, "b": 3.0}, means
assert distributed.sum_dicts({"x": 1.0}, device) == {"x": 1.0}
assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]  # CPU tensor: gloo
assert distributed.broadcast_object({"k": 1}) == {"k": 1}
distributed.barrier()
distributed.shutdown()
print("nccl group ok")
"""


def test_the_process_group_sends_cuda_tensors_by_nccl_and_cpu_tensors_by_gloo(tmp_path):
    done = run([sys.executable, "-c", NCCL_GROUP, str(tmp_path / "init")])
    assert "nccl group ok" in done.stdout
