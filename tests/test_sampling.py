"""The sampler: per-row seeds, top-k / top-p, guidance, reranking, and its input checks."""

import pytest
import torch

from parti import sampling
from parti.sampling import (
    SamplingConfig,
    _decode_and_draw,
    caption_scores,
    draw,
    filter_logits,
    generate,
    guided_logits,
    read_prompts,
    row_seed,
    sample_tokens,
    validate_sampling,
)
from tests.test_parti_model import make_batch, tiny_model


def text(lengths=(5, 3, 7, 4), seed=1):
    ids, mask, _ = make_batch(list(lengths), seed=seed)
    empty_ids = torch.zeros(1, ids.shape[1], dtype=torch.long)
    empty_ids[0, :2] = torch.tensor([2, 3])
    empty_mask = empty_ids != 0
    return ids, mask, empty_ids, empty_mask


def greedy(model, ids, mask, empty_ids=None, empty_mask=None, guidance=1.0):
    """Reference: argmax decoding with full teacher-forced passes (no cache)."""
    batch, n = len(ids), model.num_image_tokens
    tokens = torch.zeros(batch, n, dtype=torch.long, device=ids.device)
    for position in range(n):
        logits = model(ids, mask, tokens)[:, position]
        if guidance != 1.0:
            uncond = model(empty_ids.expand(batch, -1), empty_mask.expand(batch, -1),
                           tokens)[:, position]
            logits = guided_logits(logits, uncond, guidance)
        tokens[:, position] = logits.argmax(-1)
    return tokens


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_prompts_sample_does_not_depend_on_its_batch_mates(guidance):
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text()
    cfg = SamplingConfig(guidance=guidance)
    seeds = [row_seed(7, i) for i in range(4)]
    together = sample_tokens(model, ids, mask, empty_ids, empty_mask, seeds, cfg)
    for row in range(4):
        alone = sample_tokens(model, ids[row : row + 1], mask[row : row + 1], empty_ids,
                              empty_mask, seeds[row : row + 1], cfg)
        assert torch.equal(alone[0], together[row])
    reordered = sample_tokens(model, ids.flip(0), mask.flip(0), empty_ids, empty_mask,
                              seeds[::-1], cfg)
    assert torch.equal(reordered.flip(0), together)


def test_same_seed_same_sample_other_seed_other_sample():
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text((5,))
    cfg = SamplingConfig(temperature=2.0)
    first = sample_tokens(model, ids, mask, empty_ids, empty_mask, [row_seed(0)], cfg)
    again = sample_tokens(model, ids, mask, empty_ids, empty_mask, [row_seed(0)], cfg)
    other = sample_tokens(model, ids, mask, empty_ids, empty_mask, [row_seed(1)], cfg)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({row_seed(0, s, c) for s in range(4) for c in range(4)}) == 16


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6)])
def test_top_k_1_and_a_tiny_top_p_are_greedy_decoding(filters, guidance):
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text()
    cfg = SamplingConfig(guidance=guidance, temperature=1.5, **filters)
    sampled = sample_tokens(model, ids, mask, empty_ids, empty_mask, [3, 4, 5, 6], cfg)
    assert torch.equal(sampled, greedy(model, ids, mask, empty_ids, empty_mask, guidance))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_p=0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log(), top_p=0.8).isfinite()  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log()[:, [3, 1, 0, 2]], top_p=0.81).isfinite()
    assert kept.tolist() == [[False, True, True, True]]
    assert filter_logits(probs.log(), top_k=2).isfinite().tolist() == [[True, True, False, False]]


def test_draw_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, -1)
    tokens = draw(logits, torch.rand(20000, dtype=torch.float64))
    frequencies = torch.bincount(tokens, minlength=3) / 20000
    assert torch.allclose(frequencies, logits[0].softmax(-1), atol=0.015)


def test_guidance_1_is_conditional_and_0_unconditional():
    cond, uncond = torch.randn(2, 5, 9).unbind(0)
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text()
    seeds = [11, 12, 13, 14]
    unconditional = sample_tokens(model, ids, mask, empty_ids, empty_mask, seeds,
                                  SamplingConfig(guidance=0.0))
    empty_caption = sample_tokens(model, empty_ids.expand(4, -1), empty_mask.expand(4, -1),
                                  empty_ids, empty_mask, seeds, SamplingConfig(guidance=1.0))
    assert torch.equal(unconditional, empty_caption)


def test_caption_scores_are_the_log_likelihood_gain():
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask, = text()
    tokens = make_batch([1, 1, 1, 1], seed=5)[2]
    scores = caption_scores(model, ids, mask, empty_ids, empty_mask, tokens)

    def log_likelihood(i, m):
        logp = model(i, m, tokens).log_softmax(-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1).sum(1)

    expected = log_likelihood(ids, mask) - log_likelihood(empty_ids.expand(4, -1),
                                                          empty_mask.expand(4, -1))
    assert torch.allclose(scores, expected, atol=1e-4)


class FakeTextTokenizer:
    """Maps each prompt to fixed ids (prompt length = number of words)."""

    vocab_size = 64

    def encode(self, prompts, max_len):
        ids = torch.zeros(len(prompts), max_len, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = [2, *(5 + len(w) for w in prompt.split())][: max_len - 1] + [3]
            ids[row, : len(words)] = torch.tensor(words)
        return ids, ids != 0

    def overflow(self, prompts, max_len):
        return [max(0, len(p.split()) - (max_len - 2)) for p in prompts]


class FakeImageTokenizer:
    def decode(self, tokens):
        return tokens.float()[:, None, :, None].expand(-1, 3, -1, 2) / 32 - 0.5


def test_reranking_keeps_the_highest_scoring_candidate():
    model = tiny_model().eval()
    prompts = ["a red circle", "a blue square on the left"]
    seen = {}

    def scorer(texts, tokens, images):
        scores = tokens.float().sum(1) % 7  # any deterministic score
        seen["scores"] = scores.view(2, 4)
        seen["tokens"] = tokens.view(2, 4, -1)
        return scores

    cfg = SamplingConfig(guidance=2.0, candidates=4)
    out = generate(model, FakeTextTokenizer(), FakeImageTokenizer(), prompts, cfg, seed=3,
                   scorer=scorer)
    best = seen["scores"].argmax(1)
    assert torch.equal(out.tokens, seen["tokens"][torch.arange(2), best])
    assert torch.equal(out.scores, seen["scores"].max(1).values)
    # each candidate is the image that seed and candidate number give on its own
    one = generate(model, FakeTextTokenizer(), FakeImageTokenizer(), prompts[:1],
                   SamplingConfig(guidance=2.0), seed=3)
    assert torch.equal(one.tokens[0], seen["tokens"][0, 0])


def test_the_default_reranker_is_the_models_own_score():
    model = tiny_model().eval()
    cfg = SamplingConfig(guidance=1.0, candidates=3, temperature=2.0)
    out = generate(model, FakeTextTokenizer(), FakeImageTokenizer(), ["a red circle"], cfg)
    ids, mask = FakeTextTokenizer().encode(["a red circle"] * 3, model.cfg.text_len)
    empty_ids, empty_mask = FakeTextTokenizer().encode([""], model.cfg.text_len)
    candidates = torch.stack([generate(model, FakeTextTokenizer(), FakeImageTokenizer(),
                                       ["a red circle"], SamplingConfig(temperature=2.0),
                                       ).tokens[0]])
    assert candidates.shape[1] == out.tokens.shape[1]
    all_tokens = sample_tokens(model, ids, mask, empty_ids, empty_mask,
                               [row_seed(0, 0, c) for c in range(3)],
                               SamplingConfig(temperature=2.0))
    scores = caption_scores(model, ids, mask, empty_ids, empty_mask, all_tokens)
    assert torch.equal(out.tokens[0], all_tokens[scores.argmax()])


def test_batching_prompts_changes_no_image():
    model = tiny_model().eval()
    prompts = ["a red circle", "a blue square", "a green diamond at the top", "a red circle"]
    cfg = SamplingConfig(guidance=1.5)
    whole = generate(model, FakeTextTokenizer(), FakeImageTokenizer(), prompts, cfg, seed=1,
                     samples=[0, 0, 0, 1], batch_size=4)
    pieces = generate(model, FakeTextTokenizer(), FakeImageTokenizer(), prompts, cfg, seed=1,
                      samples=[0, 0, 0, 1], batch_size=1)
    assert torch.equal(whole.tokens, pieces.tokens)
    assert not torch.equal(whole.tokens[0], whole.tokens[3])  # sample 1 of a prompt differs


def eager_and_compiled(model, rows, guidance=3.0, mode="default", **settings):
    """The tokens of the compiled and the eager sampler for the first `rows` prompts, checking
    that the compiled call made one new graph (and did not fall back to eager)."""
    ids, mask, empty_ids, empty_mask = text()
    graphs = torch._dynamo.utils.counters["stats"]
    seeds = [row_seed(3, i) for i in range(rows)]
    args = (model, ids[:rows], mask[:rows], empty_ids, empty_mask, seeds)
    settings = {"top_k": 8, **settings}
    eager, compiled = (SamplingConfig(guidance=guidance, compile=c, compile_mode=mode, **settings)
                       for c in (False, True))
    before = graphs["unique_graphs"]
    tokens = sample_tokens(*args, compiled), sample_tokens(*args, eager)
    assert graphs["unique_graphs"] == before + 1
    return tokens


@pytest.mark.slow
def test_compiled_sampling_draws_the_eager_samples():
    """compile=True draws exactly the eager sampler's tokens (float32, CPU), each case a trace of
    its own: guided for two batch sizes in a row, unguided with temperature and nucleus,
    multi-query, and past torch's recompile limit (the call then runs eager). Decoder and draw,
    3 steps of them, compile as one graph."""
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text()
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    with torch._dynamo.config.patch(recompile_limit=64):
        for rows in (4, 2):
            assert torch.equal(*eager_and_compiled(model, rows))
        assert torch.equal(*eager_and_compiled(model, 2, guidance=1.0, top_k=0, top_p=0.8,
                                               temperature=0.7))
        assert torch.equal(*eager_and_compiled(tiny_model(kv_heads=1).eval(), 2))
    with torch._dynamo.config.patch(recompile_limit=1):
        before = graphs["unique_graphs"]
        assert torch.equal(*(sample_tokens(model, ids[:3], mask[:3], empty_ids, empty_mask,
                                           [row_seed(3, i) for i in range(3)],
                                           SamplingConfig(guidance=3.0, compile=c))
                             for c in (True, False)))
        assert graphs["unique_graphs"] == before
    with torch.inference_mode():
        memory = model.encode_text(ids, mask)
        cache = model.new_cache(4, like=memory)
        model.decode_step(None, memory, mask, cache, 0)
        out = torch.zeros(4, model.num_image_tokens, dtype=torch.long)
        explained = torch._dynamo.explain(_decode_and_draw)(
            model, ids[:, :1] % 8, torch.tensor(1), cache, torch.rand(4, out.shape[1]), out,
            SamplingConfig(guidance=1.0, top_k=8, top_p=0.9), 5, 3)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def flip_head(model) -> None:
    """Change a weight in place, as a training step would."""
    with torch.no_grad():
        model.head.weight.mul_(-1.0)


@pytest.mark.slow
def test_max_autotune_sampling_draws_the_eager_samples_after_a_weight_changes():
    """In max-autotune mode (weights frozen into the trace, 3 steps a call) compiled sampling
    draws the eager tokens, also after a weight changes in place (the trace is keyed on the
    weights' versions: retraced, never reused stale)."""
    model = tiny_model().eval()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        assert torch.equal(*eager_and_compiled(model, 2, mode="max-autotune"))
        flip_head(model)
        assert torch.equal(*eager_and_compiled(model, 2, mode="max-autotune"))


@pytest.mark.slow
def test_max_autotune_at_one_step_a_call_and_without_the_version_check(monkeypatch):
    """max-autotune at a grid of 9 tokens (8 after the first: one step a call) draws the eager
    tokens; with the weights' version check disabled the frozen trace is reused after a weight
    changes and its samples go stale (what the check prevents). What is tested here is the
    sampler's (freezing, steps a call, the version key), so the matmuls keep aten's kernels: the
    C++ GEMM templates, autotuned in the test above, would add ~1 min of compiling a trace."""
    model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text()
    torch._dynamo.reset()
    with (torch._dynamo.config.patch(recompile_limit=64),
          torch._inductor.config.patch(max_autotune_gemm_backends="ATEN")):
        assert torch.equal(*eager_and_compiled(tiny_model(image_grid=3).eval(), 2,
                                               mode="max-autotune"))
        monkeypatch.setattr(sampling, "_weights_version", lambda model: 0)
        assert torch.equal(*eager_and_compiled(model, 1, mode="max-autotune"))
        flip_head(model)
        seeds = [row_seed(3, 0)]
        stale = sample_tokens(model, ids[:1], mask[:1], empty_ids, empty_mask, seeds,
                              SamplingConfig(guidance=3.0, top_k=8, compile=True,
                                             compile_mode="max-autotune"))
        fresh = sample_tokens(model, ids[:1], mask[:1], empty_ids, empty_mask, seeds,
                              SamplingConfig(guidance=3.0, top_k=8))
        assert not torch.equal(stale, fresh)


def test_max_autotune_needs_weights_with_version_counters():
    with torch.inference_mode():
        model = tiny_model().eval()
    ids, mask, empty_ids, empty_mask = text()
    cfg = SamplingConfig(compile=True, compile_mode="max-autotune")
    with pytest.raises(ValueError, match=r"weights made under torch.inference_mode\(\) lack"):
        sample_tokens(model, ids[:1], mask[:1], empty_ids, empty_mask, [0], cfg)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("guidance", -0.5, "guidance: -0.5 must be >= 0"),
    ("temperature", 0.0, "temperature: 0.0 must be > 0"),
    ("top_k", -1, "top_k: -1 must be >= 0"),
    ("top_p", 0.0, r"top_p: 0.0 must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p: 1.5 must be in \(0, 1\]"),
    ("candidates", 0, "candidates: 0 must be >= 1"),
    ("compile", "yes", "compile: 'yes' must be true or false"),
    ("compile_mode", "fast", "compile_mode: 'fast' must be one of default, max-autotune"),
])
def test_bad_sampling_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=f"config error: {message}"):
        validate_sampling(SamplingConfig(**{key: value}))


def test_prompt_lists_and_files(tmp_path):
    with pytest.raises(ValueError, match="no prompts to sample: prompts is empty"):
        read_prompts([])
    with pytest.raises(FileNotFoundError, match="prompts_file .*missing.txt does not exist"):
        read_prompts([], str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="blank.txt holds no prompt"):
        read_prompts(["ignored"], str(tmp_path / "blank.txt"))
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    assert read_prompts(["ignored"], str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="no prompts to sample"):
        generate(tiny_model(), FakeTextTokenizer(), FakeImageTokenizer(), [], SamplingConfig())


def test_a_too_long_prompt_is_truncated_with_a_warning():
    model = tiny_model().eval()  # text_len 12: 10 words fit between BOS and EOS
    long_prompt = " ".join(["red"] * 13)
    with pytest.warns(UserWarning, match="3 token\\(s\\) longer than model.text_len=12"):
        generate(model, FakeTextTokenizer(), FakeImageTokenizer(), [long_prompt],
                 SamplingConfig())
