"""Factorized quantizer: gradient paths, lookup, usage statistics, dead-code restarts, DDP sync."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from parti.config import validate_vqgan
from parti.models.quantizer import FactorizedQuantizer, code_entropy
from parti.training.stage1 import VQGANTask
from parti.training.trainer import start_run
from tests.conftest import compose_config, tiny_vqgan_overrides


def _quantizer(dim: int = 16, size: int = 32, code_dim: int = 8, **kwargs) -> FactorizedQuantizer:
    torch.manual_seed(0)
    return FactorizedQuantizer(dim, size, code_dim, **kwargs)


def _identity_quantizer(size: int, window: int = 100, fraction: float = 1.0) -> FactorizedQuantizer:
    """Codes are the one-hot basis and the projection is the identity: input e_k picks code k."""
    q = FactorizedQuantizer(size, size, size, usage_window=window, restart_max_fraction=fraction)
    with torch.no_grad():
        q.proj.weight.copy_(torch.eye(size))
        q.proj.bias.zero_()
        q.codebook.copy_(torch.eye(size))
    return q


def _one_hot(ids: list[int], size: int) -> torch.Tensor:
    return F.one_hot(torch.tensor([ids]), size).float()  # (1, N, size)


def test_codebook_loss_moves_only_the_codebook():
    q = _quantizer()
    h = torch.randn(2, 5, 16, requires_grad=True)
    q(h).codebook_loss.backward()
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0
    assert q.proj.weight.grad is None and h.grad is None


def test_commitment_loss_moves_only_the_encoder_side():
    q = _quantizer()
    h = torch.randn(2, 5, 16, requires_grad=True)
    q(h).commitment_loss.backward()
    assert q.codebook.grad is None
    assert q.proj.weight.grad.abs().sum() > 0 and h.grad.abs().sum() > 0


def test_straight_through_reaches_the_encoder_and_not_the_codebook():
    q = _quantizer()
    h = torch.randn(2, 5, 16, requires_grad=True)
    out = q(h)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert h.grad.abs().sum() > 0 and q.proj.weight.grad.abs().sum() > 0
    assert q.codebook.grad is None


def test_loss_combines_terms_with_beta():
    q = _quantizer(beta=0.25)
    out = q(torch.randn(2, 5, 16))
    assert torch.allclose(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)
    assert torch.allclose(out.codebook_loss, out.commitment_loss)  # same value, different gradients


def test_ids_are_cosine_nearest_neighbours_and_codes_are_unit_norm():
    q = _quantizer().eval()
    h = torch.randn(3, 7, 16)
    out = q(h)
    z = F.normalize(q.proj(h), dim=-1)
    codes = F.normalize(q.codebook, dim=-1)
    expected = torch.cdist(z.reshape(-1, 8), codes).argmin(-1).view(3, 7)
    assert out.ids.dtype == torch.long and out.ids.shape == (3, 7)
    assert torch.equal(out.ids, expected)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(3, 7), atol=1e-5)
    assert torch.allclose(out.quantized, codes[out.ids], atol=1e-6)


def test_usage_and_perplexity_on_a_known_distribution():
    q = _identity_quantizer(4)
    assert q.usage() == {"usage": 0.0, "perplexity": 0.0}
    q(_one_hot([0, 0, 1, 1], 4))
    stats = q.usage()
    assert stats["usage"] == pytest.approx(0.5)
    assert stats["perplexity"] == pytest.approx(2.0)
    q.advance_window()
    q(_one_hot([2, 2, 3, 3], 4))
    assert q.usage() == pytest.approx({"usage": 1.0, "perplexity": 4.0})
    q(_one_hot([0, 1, 2, 2], 4))  # same step (accumulation): the window adds every forward
    # window is now [0,0,1,1,2,2,3,3,0,1,2,2]: p = 3/12, 3/12, 4/12, 2/12
    p = torch.tensor([3, 3, 4, 2]) / 12
    assert q.usage()["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)


def test_usage_window_slides_and_eval_records_nothing():
    q = _identity_quantizer(4, window=2)
    for code in range(3):  # one step each
        if code:
            q.advance_window()
        q(_one_hot([code, code], 4))
    # the first step left the window
    assert q.usage() == pytest.approx({"usage": 0.5, "perplexity": 2.0})
    q.eval()
    q(_one_hot([3, 3], 4))
    assert q.usage()["usage"] == pytest.approx(0.5)


def test_dead_code_restart_revives_unused_codes():
    q = _quantizer(dim=16, size=64, code_dim=4, restart_max_fraction=1.0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([1.0, 0, 0, 0]).expand(64, 4))  # all codes equal: only 0 wins
    data = torch.randn(8, 32, 16)
    q(data)
    before = q.usage()["usage"]
    assert before == pytest.approx(1 / 64)
    assert q.restart_dead_codes() == 63
    assert q.usage() == {"usage": 0.0, "perplexity": 0.0}  # the window was reset
    q(data)
    assert q.usage()["usage"] > 0.5
    assert q.restart_dead_codes() < 32


def test_restart_caps_the_codes_re_seeded_per_call():
    q = _quantizer(dim=16, size=64, code_dim=4, restart_max_fraction=0.25)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([1.0, 0, 0, 0]).expand(64, 4))  # only code 0 wins
    before = q.codebook.detach().clone()
    q(torch.randn(8, 32, 16))
    assert q.restart_dead_codes() == 16  # 63 dead, a quarter of 64 re-seeded
    changed = (q.codebook != before).any(dim=1)
    assert int(changed.sum()) == 16 and not changed[0]
    assert torch.equal(changed.nonzero().squeeze(1), torch.arange(1, 17))  # equally dead: by index
    assert _quantizer(size=8, restart_max_fraction=0.01).restart_limit == 1  # at least one


def test_restart_prefers_the_longest_dead_codes():
    q = _identity_quantizer(8, fraction=1 / 8)  # one code per call
    q(_one_hot([0, 1, 2, 3, 4, 5], 8))  # 6 and 7 dead: 6 goes first (tie, lower index)
    assert q.restart_dead_codes() == 1
    assert not torch.equal(q.codebook[6], torch.eye(8)[6])
    assert q.dead_for.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    q(_one_hot([0, 1, 3, 4, 5], 8))  # now 2 is newly dead, 7 dead for a second call
    assert q.restart_dead_codes() == 1
    assert not torch.equal(q.codebook[7], torch.eye(8)[7])  # the longest dead, not index 2
    assert torch.equal(q.codebook[2], torch.eye(8)[2])
    assert q.dead_for[2] == 1 and q.dead_for[7] == 0


def test_restarts_stop_after_restart_until(tmp_path):
    overrides = tiny_vqgan_overrides(tmp_path, tmp_path / "run") + [
        "model.restart_every=2", "model.restart_until=5", "loss.perceptual_weight=0"]
    task = VQGANTask(start_run(compose_config("train_vqgan", overrides), validate_vqgan))
    calls = []
    task.generator.quantizer.restart_dead_codes = lambda: calls.append(1) or 7
    restarted = [task._codebook_upkeep(done).get("codebook/restarted") for done in range(1, 11)]
    assert restarted == [None, 7.0, None, 7.0, None, None, None, None, None, None]
    assert len(calls) == 2


def test_restart_without_recent_outputs_is_a_no_op():
    q = _quantizer()
    codebook = q.codebook.detach().clone()
    assert q.restart_dead_codes() == 0
    assert torch.equal(q.codebook, codebook)


def test_statistics_are_buffers_in_the_state_dict():
    q = _quantizer(usage_window=5)
    q(torch.randn(2, 3, 16))
    state = q.state_dict()
    assert {"window_counts", "window_pos", "recent", "recent_pos", "dead_for"} <= set(state)
    assert state["window_counts"].shape == (5, 32) and state["window_counts"][0].sum() == 6
    q.advance_window()
    assert int(q.state_dict()["window_pos"]) == 1
    assert {name for name, _ in q.named_parameters()} == {"proj.weight", "proj.bias", "codebook"}


def test_dead_for_round_trips_and_older_state_without_it_loads():
    q = _identity_quantizer(4)
    q(_one_hot([0, 0], 4))
    q.restart_dead_codes()
    other = _identity_quantizer(4)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.dead_for, q.dead_for)
    old = {k: v for k, v in q.state_dict().items() if k != "dead_for"}
    other.load_state_dict(old)
    assert torch.equal(other.dead_for, torch.zeros(4, dtype=torch.long))


def test_bad_usage_window_and_restart_fraction_are_rejected():
    with pytest.raises(ValueError, match="usage_window"):
        FactorizedQuantizer(8, 16, 4, usage_window=0)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="restart_max_fraction"):
            FactorizedQuantizer(8, 16, 4, restart_max_fraction=fraction)


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a collective mismatch fails
    try:
        q = _identity_quantizer(4)
        q(_one_hot([rank, rank], 4))  # rank 0 uses code 0, rank 1 code 1
        first = (q.usage(), q.restart_dead_codes(), q.codebook.detach().clone())
        capped = _identity_quantizer(4, fraction=0.25)
        # every rank runs each forward (the counts are summed there), with its own batch size
        capped(_one_hot([0, 0] if rank == 0 else [0], 4))
        second = (capped.restart_dead_codes(), capped.codebook.detach().clone(), capped.dead_for)
        results[rank] = first + second
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_restart_under_ddp_sums_counts_and_syncs_the_codebook(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
        (usage0, restarted0, book0, capped0, cbook0, dead0) = results[0]
        (usage1, restarted1, book1, capped1, cbook1, dead1) = results[1]
    assert usage0 == usage1 == pytest.approx({"usage": 0.5, "perplexity": 2.0})
    assert restarted0 == restarted1 == 2  # codes 2 and 3: unused on every rank
    assert torch.equal(book0, book1)
    assert torch.equal(book0[:2], torch.eye(4)[:2])
    assert capped0 == capped1 == 1  # codes 1, 2, 3 dead; one re-seeded: code 1
    assert torch.equal(cbook0, cbook1) and torch.equal(dead0, dead1)
    assert torch.equal(cbook0[2:], torch.eye(4)[2:]) and not torch.equal(cbook0[1], torch.eye(4)[1])


def test_code_entropy_is_low_per_vector_and_high_over_a_spread_batch():
    codes = torch.eye(4)
    spread = torch.eye(4)[None]  # four vectors, each exactly on its own code
    per_vector, batch = code_entropy(spread, codes, temperature=0.01)
    assert per_vector.item() < 1e-6 and batch.item() == pytest.approx(math.log(4), abs=1e-5)
    collapsed = torch.eye(4)[[0, 0, 0, 0]][None]  # the whole batch on one code
    _, batch_collapsed = code_entropy(collapsed, codes, temperature=0.01)
    assert batch_collapsed.item() < 1e-6
    # a subsample scores that many vectors
    assert code_entropy(spread, codes, 0.01, samples=2)[1].item() == pytest.approx(math.log(2), abs=1e-5)


def test_code_entropy_of_confident_vectors_matches_a_float64_reference():
    """Where float32 probabilities underflow (log p < -87: exp() is slow there on the CPU, and a
    code no vector is near would get p = 0 and a NaN gradient) the entropies and their gradients
    still match the float64 computation."""
    torch.manual_seed(0)
    codes = F.normalize(torch.randn(64, 8, dtype=torch.float64), dim=-1)
    codes[-1] = -F.normalize(codes[:4].mean(dim=0), dim=0)  # far from every vector below
    z_e = F.normalize(codes[torch.randint(4, (1, 32))] + 0.3 * torch.randn(1, 32, 8,
                      dtype=torch.float64), dim=-1)
    log_p = (z_e.reshape(-1, 8) @ codes.T / 0.004).log_softmax(dim=-1)
    assert log_p[:, -1].max() < -110  # float32 exp() gives exactly 0 for the last code

    def exact(z: torch.Tensor, c: torch.Tensor, temperature: float):
        log_p = (z.reshape(-1, 8) @ c.T / temperature).log_softmax(dim=-1)  # float64: no underflow
        p, mean_p = log_p.exp(), log_p.exp().mean(dim=0)
        return -(p * log_p).sum(dim=-1).mean(), -(mean_p * mean_p.log()).sum()

    results = []
    for fn, dtype in ((code_entropy, torch.float32), (exact, torch.float64)):
        z, c = z_e.to(dtype).requires_grad_(), codes.to(dtype).requires_grad_()
        per_vector, batch = fn(z, c, 0.004)
        (per_vector - 2 * batch).backward()
        results.append([t.double() for t in (per_vector, batch, z.grad, c.grad)])
    for ours, reference in zip(*results):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, reference, rtol=1e-4,
                                   atol=1e-4 * reference.abs().max().item())


def test_entropy_penalty_spreads_a_collapsed_codebook():
    """A few steps on the penalty alone move vectors that all chose one code onto several."""
    torch.manual_seed(0)
    q = FactorizedQuantizer(8, 16, 4)
    h = (torch.randn(1, 64, 8) * 0.01 + torch.randn(1, 1, 8)).requires_grad_()
    opt = torch.optim.Adam([h, *q.parameters()], lr=0.05)
    used_before = q(h).ids.unique().numel()
    for _ in range(50):
        out = q(h)
        per_vector, batch = code_entropy(out.z_e, out.codes, temperature=0.1)
        opt.zero_grad()
        (per_vector - batch).backward()
        opt.step()
    assert q(h).ids.unique().numel() > max(used_before, 4)
