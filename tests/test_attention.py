"""Grouped-query and multi-query attention: each key/value head serves its group of query heads,
in training, in cached decoding and in the fixed-shape decoding step."""

import pytest
import torch

from parti.models.layers import Attention, KVCache

DIM, HEADS, HEAD_DIM = 32, 4, 8


def grouped_and_repeated(kv_heads: int) -> tuple[Attention, Attention]:
    """An attention with `kv_heads` key/value heads and the multi-head attention that computes the
    same function: its key/value projection repeats each grouped head for the queries it serves."""
    torch.manual_seed(0)
    grouped = Attention(DIM, HEADS, kv_heads=kv_heads).eval()
    full = Attention(DIM, HEADS).eval()
    group = HEADS // kv_heads
    with torch.no_grad():
        for name in ("to_q", "proj"):
            getattr(full, name).load_state_dict(getattr(grouped, name).state_dict())
        for name in ("weight", "bias"):
            k, v = getattr(grouped.to_kv, name).chunk(2)  # (kv_heads * Dh, ...) each
            per_head = [t.unflatten(0, (kv_heads, HEAD_DIM)).repeat_interleave(group, 0).flatten(0, 1)
                        for t in (k, v)]
            getattr(full.to_kv, name).copy_(torch.cat(per_head))
    return grouped, full


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_attention_equals_multi_head_with_repeated_keys_values(kv_heads):
    grouped, full = grouped_and_repeated(kv_heads)
    assert grouped.to_kv.out_features == 2 * kv_heads * HEAD_DIM
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 7, DIM, generator=g), torch.randn(3, 5, DIM, generator=g)
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    with torch.no_grad():
        for kwargs in (dict(causal=True), dict(causal=True, key_mask=key_mask[:, :1].repeat(1, 7)),
                       dict(context=context, key_mask=key_mask)):
            assert torch.allclose(grouped(x, **kwargs), full(x, **kwargs), atol=1e-6), kwargs

        caches = [m.allocate_self_cache(3, 7, x) for m in (grouped, full)]
        assert caches[0].k.shape == (3, kv_heads, 7, HEAD_DIM)
        stepped = [[m(x[:, :3], causal=True, cache=c)] for m, c in zip((grouped, full), caches)]
        for position in range(3, 7):
            for m, c, outs in zip((grouped, full), caches, stepped):
                outs.append(m.step(x[:, position : position + 1], c, torch.tensor(position)))
        ours, reference = (torch.cat(outs, dim=1) for outs in stepped)
        assert torch.allclose(ours, full(x, causal=True), atol=1e-6)
        assert torch.allclose(ours, reference, atol=1e-6)

        cross = [KVCache() for _ in range(2)]
        first = [m(x[:, :1], context, key_mask, cache=c) for m, c in zip((grouped, full), cross)]
        assert torch.allclose(*first, atol=1e-6)
        later = [m.step(x[:, 1:2], c, None) for m, c in zip((grouped, full), cross)]
        assert torch.allclose(*later, atol=1e-6)
        assert torch.allclose(later[0], full(x, context, key_mask)[:, 1:2], atol=1e-6)


@pytest.mark.parametrize("kv_heads", [3, 0, 8])
def test_kv_heads_must_divide_heads(kv_heads):
    with pytest.raises(ValueError, match=f"heads 4 are not divisible by kv_heads {kv_heads}"):
        Attention(DIM, HEADS, kv_heads=kv_heads)
