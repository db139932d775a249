"""Text -> image tokens -> pixels: KV-cached, batched decoding with classifier-free guidance.

With guidance g != 1 each prompt is decoded together with the empty caption in one batch of 2B and
the logits are mixed as `uncond + g * (cond - uncond)` (g = 1 is plain conditional sampling, g = 0
unconditional). Each row draws its randomness from its own seed (inverse-CDF sampling from
per-row uniforms), so a prompt's image does not depend on the other prompts in its batch.
Reranking draws several candidates per prompt and keeps the one a `Scorer` likes best.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from parti.config_errors import check_config
from parti.models.parti import Parti
from parti.models.vitvqgan import VitVQGAN
from parti.text.tokenizer import TextTokenizer

COMPILE_MODES = ("default", "max-autotune")
STEPS_PER_CALL = 3  # max-autotune's decoding steps a call, where they divide the later tokens


@dataclass
class SamplingConfig:
    """How tokens are drawn: guidance scale, temperature, top-k, top-p, reranking candidates."""

    guidance: float = 1.0  # classifier-free guidance scale (1 = conditional only, 0 = unconditional)
    temperature: float = 1.0  # logits are divided by this (> 0)
    top_k: int = 0  # keep the k most likely tokens and any tied with the k-th (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1 = all)
    candidates: int = 1  # draw this many images per sample and keep the best-scoring one
    compile: bool = False  # torch.compile each step: faster; one compile a batch size and setting
    compile_mode: str = "default"  # or "max-autotune": faster steps, ~3-4x the compile time


def validate_sampling(cfg: SamplingConfig, prefix: str = "") -> None:
    """Reject impossible sampling values with a message that names the key."""
    checks = (
        (cfg.guidance >= 0, "guidance", f"{cfg.guidance} must be >= 0 (1 = no guidance)"),
        (cfg.temperature > 0, "temperature", f"{cfg.temperature} must be > 0"),
        (cfg.top_k >= 0, "top_k", f"{cfg.top_k} must be >= 0 (0 = no top-k filter)"),
        (0 < cfg.top_p <= 1, "top_p", f"{cfg.top_p} must be in (0, 1] (1 = no nucleus filter)"),
        (cfg.candidates >= 1, "candidates", f"{cfg.candidates} must be >= 1"),
        (isinstance(cfg.compile, bool), "compile", f"{cfg.compile!r} must be true or false"),
        (cfg.compile_mode in COMPILE_MODES, "compile_mode",
         f"{cfg.compile_mode!r} must be one of {', '.join(COMPILE_MODES)}"),
    )
    for ok, key, message in checks:
        check_config(ok, prefix + key, message)


def row_seed(seed: int, sample: int = 0, candidate: int = 0) -> int:
    """A 63-bit seed for one image: the same (seed, sample, candidate) always gives the same one."""
    digest = hashlib.blake2b(f"{seed}/{sample}/{candidate}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(seeds: Sequence[int], n: int, device: torch.device | str) -> Tensor:
    """Uniforms (B, n) in [0, 1): row b is drawn from its own generator seeded with seeds[b]."""
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device)


def guided_logits(cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance uncond + g * (cond - uncond); exactly cond at g = 1, uncond at 0."""
    return torch.lerp(uncond, cond, guidance)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top k (k = 0: none) and outside the nucleus p.

    The nucleus is the smallest set of most likely tokens whose probability reaches p; the most
    likely token always stays, so a tiny p is greedy decoding.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Tokens (B,) drawn from softmax(logits) (B, K) by inverting the CDF at uniforms (B,)."""
    cdf = logits.double().softmax(-1).cumsum(-1)  # (B, K)
    target = (uniforms * cdf[:, -1]).unsqueeze(1)  # (B, 1): scaled so that rounding cannot overrun
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_tokens(
    model: Parti,
    text_ids: Tensor,
    text_mask: Tensor,
    empty_ids: Tensor,
    empty_mask: Tensor,
    seeds: Sequence[int],
    cfg: SamplingConfig,
) -> Tensor:
    """Image tokens (B, N) for the captions (B, L); `empty_*` (1, L) is the unconditional caption.

    Row b's randomness comes from seeds[b] alone. The loop runs in inference mode (no autograd
    bookkeeping per token); the returned tokens are an ordinary tensor. With cfg.compile, the
    steps after the first (`_decode_and_draw`: decoder and draw) are compiled calls (see
    `_compiled_steps`).
    """
    batch, n = len(text_ids), model.num_image_tokens
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} captions")
    guided = cfg.guidance != 1.0
    with torch.inference_mode():
        if guided:
            text_ids = torch.cat([text_ids, empty_ids.expand(batch, -1)])
            text_mask = torch.cat([text_mask, empty_mask.expand(batch, -1)])
        uniforms = row_uniforms(seeds, n, text_ids.device)  # (B, N)
        memory = model.encode_text(text_ids, text_mask)  # (B or 2B, L, D)
        cache = model.new_cache(len(text_ids), like=memory)
        out = torch.zeros(batch, n, dtype=torch.long, device=text_ids.device)
        positions = torch.arange(n, device=text_ids.device)
        logits = model.decode_step(None, memory, text_mask, cache, 0)[:, -1]
        fed = _draw_next(logits, positions[0], uniforms, out, cfg)
        if cfg.compile:
            _compiled_steps(model, fed, positions, cache, uniforms, out, cfg)
        else:
            for position in range(1, n):
                logits = model.decode_step(fed, memory, text_mask, cache, position)[:, -1]
                fed = _draw_next(logits, positions[position], uniforms, out, cfg)
    return out.clone()


def _draw_next(logits: Tensor, position: Tensor, uniforms: Tensor, out: Tensor,
               cfg: SamplingConfig) -> Tensor:
    """Draw image token `position` (a 0-d long tensor) of every row from the decoder's logits
    (B, K; 2B when guided) into out (B, N) and return the next decoder input (B or 2B, 1)."""
    logits = logits.float()
    guided = cfg.guidance != 1.0
    if guided:
        logits = guided_logits(*logits.chunk(2), cfg.guidance)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    slot = position.view(1)
    token = draw(logits, uniforms.index_select(1, slot)[:, 0])  # (B,)
    out.index_copy_(1, slot, token[:, None])
    return (torch.cat([token, token]) if guided else token)[:, None]


def _weights_version(model: torch.nn.Module) -> int:
    """The sum of the version counters of the model's parameters and buffers: it grows with every
    in-place change of a weight (an optimizer step, an EMA update, load_state_dict), though not
    with writes through `.data`, which torch does not count."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if any(t.is_inference() for t in tensors):
        raise ValueError("compile_mode=max-autotune freezes the weights and tracks their version "
                         "counters, which weights made under torch.inference_mode() lack: build "
                         "or load the model outside inference mode")
    return sum(t._version for t in tensors)


def _decode_and_draw(model: Parti, fed: Tensor, position: Tensor, cache: list, uniforms: Tensor,
                     out: Tensor, cfg: SamplingConfig, version: int = 0, steps: int = 1) -> Tensor:
    """`steps` sampling steps at a fixed shape from image token `position` on, each
    `Parti.decode_fixed` then `_draw_next`; returns the next decoder input.

    `version` is the model's `_weights_version`; checking it makes a compiled trace specific to it,
    so a trace that froze the weights as constants is never reused after they change."""
    torch._check(version >= 0)
    for i in range(steps):
        fed = _draw_next(model.decode_fixed(fed, position + i, cache), position + i, uniforms, out,
                         cfg)
    return fed


def _compiled_steps(model: Parti, fed: Tensor, positions: Tensor, cache: list, uniforms: Tensor,
                    out: Tensor, cfg: SamplingConfig) -> None:
    """Image tokens 1.. into `out` by calls of `_decode_and_draw` under torch.compile: one trace
    per batch size, model and sampling setting (and, frozen, weights version).

    The draw is in the trace too: eager ops between compiled calls run slowly (the step's weights
    have just streamed through the caches), ~0.15 ms a token at batch 1. On the CPU the step is
    called through a C++ wrapper: at batch 1 the Python launch of its ~50 small kernels would
    otherwise cost about as much as the kernels.

    `compile_mode="max-autotune"` trades compile time for step time:
    - the matmuls are autotuned (on the CPU against C++ GEMM templates that fuse the layer norms,
      biases and GELU around them);
    - on the CPU the weights are frozen into the trace, prepacked (torch reads `freezing` when it
      traces, hence the setting around the loop); the weights version passed to
      `_decode_and_draw` retraces after an in-place weight change;
    - each call runs STEPS_PER_CALL steps where they divide the tokens after the first (a grid
      that is not a multiple of 3 always has such a count; else one step a call): a call costs
      ~0.12 ms besides its kernels (torch's guard checks ~70 us, its wrappers), over 10% of a
      batch-1 step. Not in default mode: it triples the graph, and its compile time with it.
    Past torch's recompile limit (8 traces) a call runs eager, with torch's warning.
    """
    cpu = out.device.type == "cpu"
    autotune = cfg.compile_mode == "max-autotune"
    options = {"cpp_wrapper": True} if cpu else {}
    if autotune:  # quiet: torch otherwise prints every matmul's timing table
        options.update(max_autotune=True, autotune_num_choices_displayed=0,
                       max_autotune_report_choices_stats=False)
    step = torch.compile(_decode_and_draw, dynamic=False, options=options)
    frozen = cpu and autotune
    version = _weights_version(model) if frozen else 0
    per_call = STEPS_PER_CALL if autotune and (len(positions) - 1) % STEPS_PER_CALL == 0 else 1
    with torch._inductor.config.patch(freezing=True) if frozen else contextlib.nullcontext():
        for position in positions[1::per_call]:
            fed = step(model, fed, position, cache, uniforms, out, cfg, version, per_call)


@torch.no_grad()
def caption_scores(
    model: Parti, text_ids: Tensor, text_mask: Tensor, empty_ids: Tensor, empty_mask: Tensor,
    tokens: Tensor,
) -> Tensor:
    """log p(tokens | caption) - log p(tokens | empty caption) per image (B,), in nats.

    The model's own measure of how much the caption explains the image: no extra network.
    """
    batch = len(tokens)
    ids = torch.cat([text_ids, empty_ids.expand(batch, -1)])
    mask = torch.cat([text_mask, empty_mask.expand(batch, -1)])
    logits = model(ids, mask, tokens.repeat(2, 1)).float()  # (2B, N, K)
    log_likelihood = -F.cross_entropy(logits.transpose(1, 2), tokens.repeat(2, 1),
                                      reduction="none").sum(1)  # (2B,)
    cond, uncond = log_likelihood.chunk(2)
    return cond - uncond


class Scorer(Protocol):
    """Scores candidate images for their prompts; higher is better. Plug in e.g. a CLIP model."""

    def __call__(self, prompts: list[str], tokens: Tensor, images: Tensor) -> Tensor:
        """prompts (B), image tokens (B, N), images (B, 3, H, W) in [-1, 1] -> scores (B,)."""


class ModelScorer:
    """The stage-2 model's own score: caption log-likelihood gain over the empty caption."""

    def __init__(self, model: Parti, text_tokenizer: TextTokenizer):
        self.model, self.text_tokenizer = model, text_tokenizer

    def __call__(self, prompts: list[str], tokens: Tensor, images: Tensor) -> Tensor:
        device = tokens.device
        text_len = self.model.cfg.text_len
        ids, mask = self.text_tokenizer.encode(prompts, text_len)
        empty_ids, empty_mask = self.text_tokenizer.encode([""], text_len)
        return caption_scores(self.model, ids.to(device), mask.to(device), empty_ids.to(device),
                              empty_mask.to(device), tokens)


@dataclass
class Generated:
    """Images (B, 3, H, W) in [-1, 1], their tokens (B, N) and reranking scores (B,) or None."""

    images: Tensor
    tokens: Tensor
    scores: Tensor | None


def warn_truncated(text_tokenizer: TextTokenizer, prompts: Sequence[str], text_len: int) -> None:
    """Warn, per prompt, how many of its tokens do not fit into text_len and are dropped."""
    for prompt, dropped in zip(prompts, text_tokenizer.overflow(prompts, text_len)):
        if dropped:
            warnings.warn(f"prompt {prompt!r} is {dropped} token(s) longer than model.text_len="
                          f"{text_len}: they are dropped", stacklevel=3)


def read_prompts(prompts: Sequence[str], prompts_file: str = "") -> list[str]:
    """The prompts to sample: the lines of `prompts_file` (blank lines skipped) when set."""
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file {path} does not exist (one prompt a line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        where = f"prompts_file {path} holds no prompt"
    else:
        prompts = list(prompts)
        where = "prompts is empty"
    if not prompts:
        raise ValueError(f"no prompts to sample: {where}; give at least one")
    return prompts


@torch.no_grad()
def generate(
    model: Parti,
    text_tokenizer: TextTokenizer,
    image_tokenizer: VitVQGAN,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    seed: int = 0,
    samples: Sequence[int] | None = None,
    scorer: Scorer | None = None,
    batch_size: int = 64,
) -> Generated:
    """One image per prompt: prompt b's image depends on (prompt, seed, samples[b]) alone.

    `samples` numbers the images of a repeated prompt (default 0 for every prompt). With
    cfg.candidates = K > 1, K images are drawn per prompt and the one `scorer` (default: the
    model's own caption score) rates highest is kept. Prompts are decoded `batch_size` at a time.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample: give at least one")
    validate_sampling(cfg)
    samples = [0] * len(prompts) if samples is None else list(samples)
    if len(samples) != len(prompts):
        raise ValueError(f"got {len(samples)} sample numbers for {len(prompts)} prompts")
    warn_truncated(text_tokenizer, prompts, model.cfg.text_len)
    scorer = scorer or ModelScorer(model, text_tokenizer)
    parts = [_generate_batch(model, text_tokenizer, image_tokenizer, prompts[i : i + batch_size],
                             samples[i : i + batch_size], cfg, seed, scorer)
             for i in range(0, len(prompts), max(1, batch_size))]
    scores = None if parts[0].scores is None else torch.cat([p.scores for p in parts])
    return Generated(torch.cat([p.images for p in parts]), torch.cat([p.tokens for p in parts]),
                     scores)


def _generate_batch(model, text_tokenizer, image_tokenizer, prompts, samples, cfg, seed,
                    scorer) -> Generated:
    device = next(model.parameters()).device
    text_len, k = model.cfg.text_len, cfg.candidates
    ids, mask = text_tokenizer.encode(prompts, text_len)
    empty_ids, empty_mask = text_tokenizer.encode([""], text_len)
    model.check_text_values(torch.cat([ids, empty_ids]), torch.cat([mask, empty_mask]))
    seeds = [row_seed(seed, s, c) for s in samples for c in range(k)]  # prompt-major (B * K)
    tokens = sample_tokens(model, ids.repeat_interleave(k, 0).to(device),
                           mask.repeat_interleave(k, 0).to(device), empty_ids.to(device),
                           empty_mask.to(device), seeds, cfg)
    images = image_tokenizer.decode(tokens).float().clamp(-1, 1)
    if k == 1:
        return Generated(images, tokens, None)
    scores = scorer([p for p in prompts for _ in range(k)], tokens, images).view(-1, k)  # (B, K)
    best = scores.argmax(1) + torch.arange(len(prompts), device=scores.device) * k  # (B,)
    return Generated(images[best], tokens[best], scores.flatten()[best])
