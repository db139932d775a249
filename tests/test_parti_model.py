"""Stage-2 encoder-decoder: it learns, is causal, ignores padding, decodes with the KV cache exactly
as teacher forcing does (multi-head, grouped- and multi-query), has the paper's sizes, and rejects
bad configs and inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from parti.models.parti import Parti, PartiConfig, validate

TINY = dict(
    vocab_size=64,
    text_len=12,
    codebook_size=32,
    image_grid=4,
    dim=32,
    enc_layers=2,
    dec_layers=2,
    heads=4,
    mlp_dim=64,
)
N = TINY["image_grid"] ** 2

PAPER = dict(vocab_size=16000, text_len=128, codebook_size=8192, image_grid=32)
SIZES = {  # name: (enc layers, dec layers, d, MLP, heads, paper's non-embedding params)
    "parti_350m": (12, 12, 1024, 4096, 16, 352e6),
    "parti_750m": (12, 36, 1024, 4096, 16, 755e6),
    "parti_3b": (12, 36, 2048, 8192, 32, 3.02e9),
    "parti_20b": (16, 64, 4096, 16384, 64, 20.4e9),
}


def tiny_model(**overrides) -> Parti:
    torch.manual_seed(0)
    return Parti(PartiConfig(**{**TINY, **overrides}))


def make_batch(lengths: list[int], text_len: int = 8, seed: int = 1):
    """Random captions of the given real lengths, right-padded with id 0, and random image tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (len(lengths), text_len), generator=g)
    mask = torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    ids[~mask] = 0
    tokens = torch.randint(0, TINY["codebook_size"], (len(lengths), N), generator=g)
    return ids, mask, tokens


def decode_all(model: Parti, ids, mask, tokens, prefill: int = 0):
    """Logits (B, N, K) from decode_step: `prefill` tokens in the first call, then one per step."""
    memory = model.encode_text(ids, mask)
    cache = model.new_cache(ids.shape[0], like=memory)
    outs = [model.decode_step(tokens[:, :prefill] if prefill else None, memory, mask, cache, 0)]
    for position in range(prefill + 1, N):
        outs.append(
            model.decode_step(tokens[:, position - 1 : position], memory, mask, cache, position)
        )
    return torch.cat(outs, dim=1)


KV_HEADS = [None, 2, 1]  # one key/value head per query head, 2 groups of 2, multi-query


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_adamw_steps_lower_the_loss(kv_heads, bias):
    model = tiny_model(dropout=0.0, kv_heads=kv_heads, bias=bias)
    ids, mask, tokens = make_batch([3, 8, 5, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model(ids, mask, tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(TINY["codebook_size"]), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_changing_image_token_j_never_changes_logits_up_to_j(kv_heads):
    model = tiny_model(kv_heads=kv_heads).eval()
    ids, mask, tokens = make_batch([5, 8])
    with torch.no_grad():
        ref = model(ids, mask, tokens)
        for j in range(N):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1) % TINY["codebook_size"]
            out = model(ids, mask, changed)
            assert torch.equal(out[:, : j + 1], ref[:, : j + 1]), j
            if j < N - 1:
                assert not torch.allclose(out[:, j + 1], ref[:, j + 1]), j


def test_text_padding_changes_nothing():
    model = tiny_model().eval()
    ids, mask, tokens = make_batch([3, 6], text_len=6)
    longer_ids = F.pad(ids, (0, 5))  # (B, 11): five more pads
    longer_mask = F.pad(mask, (0, 5))
    other_pad_ids = torch.where(longer_mask, longer_ids, torch.randint_like(longer_ids, 1, 64))
    with torch.no_grad():
        ref = model(ids, mask, tokens)
        assert torch.allclose(model(longer_ids, longer_mask, tokens), ref, atol=1e-5)
        assert torch.allclose(model(other_pad_ids, longer_mask, tokens), ref, atol=1e-5)
        other_real = ids.clone()
        other_real[0, 0] = ids[0, 0] % 63 + 1  # a real token does matter
        assert not torch.allclose(model(other_real, mask, tokens)[0], ref[0], atol=1e-3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("prefill", [0, 5])
def test_cached_decoding_equals_teacher_forcing(prefill, kv_heads, bias):
    model = tiny_model(kv_heads=kv_heads, bias=bias).eval()
    ids, mask, tokens = make_batch([2, 8, 5])
    with torch.no_grad():
        ref = model(ids, mask, tokens)
        out = decode_all(model, ids, mask, tokens, prefill)
    assert out.shape == ref.shape == (3, N, TINY["codebook_size"])
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_fixed_shape_decoding_equals_teacher_forcing(kv_heads, bias):
    """decode_fixed (what the compiled sampler traces) gives teacher forcing's logits, padded
    captions included, after a decode_step at position 0 has filled the caches."""
    model = tiny_model(kv_heads=kv_heads, bias=bias).eval()
    ids, mask, tokens = make_batch([2, 8, 5])
    with torch.no_grad():
        ref = model(ids, mask, tokens)
        memory = model.encode_text(ids, mask)
        cache = model.new_cache(3, like=memory)
        outs = [model.decode_step(None, memory, mask, cache, 0)[:, -1]]
        for position in range(1, N):
            outs.append(model.decode_fixed(tokens[:, position - 1 : position],
                                           torch.tensor(position), cache))
    assert torch.allclose(torch.stack(outs, dim=1), ref, atol=1e-5)
    with pytest.raises(ValueError, match="run decode_step at position 0 first"):
        model.decode_fixed(tokens[:, :1], torch.tensor(1), model.new_cache(3, like=memory))
    with pytest.raises(RuntimeError, match="decode_fixed is for inference"):
        model.train().decode_fixed(tokens[:, :1], torch.tensor(1), cache)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_cached_decoding_reorders_batch_rows(kv_heads):
    model = tiny_model(kv_heads=kv_heads).eval()
    ids, mask, tokens = make_batch([2, 8, 5])
    order = torch.tensor([2, 0])
    with torch.no_grad():
        ref = model(ids[order], mask[order], tokens[order])
        memory = model.encode_text(ids, mask)
        cache = model.new_cache(3, like=memory)
        first = model.decode_step(tokens[:, :3], memory, mask, cache, 0)  # start + 3 tokens
        for block_cache in cache:
            block_cache.self_attn.reorder(order)
            block_cache.cross_attn.reorder(order)
        rest = model.decode_step(tokens[order, 3:-1], memory[order], mask[order], cache, 4)
    assert torch.allclose(torch.cat([first[order], rest], dim=1), ref, atol=1e-5)


def test_decode_step_rejects_misuse():
    model = tiny_model().eval()
    ids, mask, tokens = make_batch([2, 8])
    memory = model.encode_text(ids, mask)
    cache = model.new_cache(2, like=memory)
    with pytest.raises(ValueError, match="position 1 does not match"):
        model.decode_step(tokens[:, :1], memory, mask, cache, 1)
    with pytest.raises(ValueError, match="image has 16 tokens"):
        model.decode_step(tokens, memory, mask, cache, 0)
    model.decode_step(None, memory, mask, cache, 0)
    with pytest.raises(ValueError, match="start step"):
        model.decode_step(None, memory, mask, cache, 1)
    with pytest.raises(ValueError, match=r"must be a \(2, N\) long tensor"):
        model.decode_step(tokens[:1, :1], memory, mask, cache, 1)
    with pytest.raises(ValueError, match="cache has 1 blocks"):
        model.decode_step(tokens[:, :1], memory, mask, cache[:1], 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, m, t: (i, m, t[:, :-1]), "15 image tokens"),
        (lambda i, m, t: (i, m.long(), t), "bool"),
        (lambda i, m, t: (i[:, :5], m, t), "shaped like"),
        (lambda i, m, t: (F.pad(i, (0, 5)), F.pad(m, (0, 5)), t), "text_len is 12"),
    ],
)
def test_forward_rejects_bad_shapes(change, message):
    model = tiny_model()
    ids, mask, tokens = make_batch([2, 8])
    with pytest.raises(ValueError, match=message):
        model(*change(ids, mask, tokens))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, m, t: (i, m, t + 32), "codebook_size"),
        (lambda i, m, t: (i + 64, m, t), "vocab_size"),
        (lambda i, m, t: (i, m & torch.tensor([[True], [False]]), t), "no real token"),
    ],
)
def test_data_path_checks_reject_bad_values(change, message):
    model = tiny_model()
    ids, mask, tokens = change(*make_batch([2, 8]))
    with pytest.raises(ValueError, match=message):
        model.check_text_values(ids, mask)
        model.check_token_values(tokens)


@pytest.mark.parametrize("name", ["parti_tiny", *SIZES])
def test_sizes_match_the_paper_on_meta(name, capsys):
    if name == "parti_tiny":
        cfg = PartiConfig()
        expected = 12 * cfg.dim**2 * cfg.enc_layers + 16 * cfg.dim**2 * cfg.dec_layers
    else:
        enc, dec, dim, mlp, heads, expected = SIZES[name]
        sizes = dict(dim=dim, enc_layers=enc, dec_layers=dec, heads=heads, mlp_dim=mlp)
        cfg = PartiConfig(name, **PAPER, **sizes)
    with torch.device("meta"):
        model = Parti(cfg)
    assert model.head.weight.is_meta
    assert abs(model.num_params() / expected - 1) < 0.05
    embeddings = (cfg.vocab_size + cfg.text_len + cfg.codebook_size * 2 + 1) * cfg.dim
    assert model.num_params(non_embedding=False) > model.num_params() + embeddings
    assert capsys.readouterr() == ("", "")


def test_flops_per_token_follows_the_closed_form():
    enc, dec, d, mlp, heads, _ = SIZES["parti_350m"]
    with torch.device("meta"):
        cfg = PartiConfig(**PAPER, dim=d, enc_layers=enc, dec_layers=dec, heads=heads, mlp_dim=mlp)
        model = Parti(cfg)
    n, text_len, k = 1024, 128, 8192
    per_image_token = dec * 14 * d**2 + d * k  # self-attn, cross q/out, MLP; output projection
    per_text_token = enc * 12 * d**2 + dec * 2 * d**2  # encoder; cross-attention keys/values
    attention = 12 * d * (dec * (n + text_len) + enc * text_len**2 / n)
    expected = 6 * (per_image_token + per_text_token * text_len / n) + attention
    assert model.flops_per_token() == pytest.approx(expected, rel=0.01)
    with torch.device("meta"):  # multi-query: keys/values 2 * d * d / heads per layer, not 2 d^2
        model = Parti(PartiConfig(**{**vars(cfg), "kv_heads": 1}))
    saved = 2 * d**2 * (1 - 1 / heads)
    fewer = 6 * (dec * saved + (enc + dec) * saved * text_len / n)
    assert model.flops_per_token() == pytest.approx(expected - fewer, rel=0.01)


def test_residual_projections_are_scaled_by_depth():
    model = tiny_model(dim=256, mlp_dim=256, dec_layers=8)
    std = model.cfg.init_std
    assert model.decoder[0].mlp.fc1.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.decoder[0].attn.proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert model.decoder[0].cross_attn.proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert model.encoder[0].mlp.fc2.weight.std().item() == pytest.approx(std / 2, rel=0.05)
    assert model.decoder[0].attn.proj.bias.abs().sum() == 0
    assert model.text_emb.weight[0].abs().sum() == 0
    # word embeddings start at unit scale (T5): captions stay distinct through the encoder
    assert model.text_emb.weight[1:].std().item() == pytest.approx(1.0, rel=0.05)
    assert model.image_emb.weight.std().item() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize(
    "key, value",
    [
        ("vocab_size", 1),
        ("text_len", 0),
        ("codebook_size", -4),
        ("image_grid", 0),
        ("dim", 30),
        ("enc_layers", 0),
        ("dec_layers", 2.5),
        ("heads", 0),
        ("kv_heads", 3),
        ("kv_heads", 0),
        ("kv_heads", True),
        ("mlp_dim", 0),
        ("dropout", 1.0),
        ("text_dropout", -0.1),
        ("init_std", 0.0),
        ("bias", "false"),
        ("tie_embeddings", 1),
    ],
)
def test_validate_names_the_bad_key(key, value):
    cfg = PartiConfig(**{**TINY, key: value})
    with pytest.raises(ValueError, match=f"model.{key}"):
        validate(cfg)
    with pytest.raises(ValueError, match=f"model.{key}"):
        Parti(cfg)


def test_tie_embeddings_shares_the_weight():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model()
    assert tied.head.weight is tied.image_emb.weight
    assert untied.head.weight is not untied.image_emb.weight
    extra = TINY["codebook_size"] * TINY["dim"]
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == extra
    ids, mask, tokens = make_batch([3, 8])
    opt = torch.optim.SGD(tied.parameters(), lr=1.0)
    F.cross_entropy(tied(ids, mask, tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    assert torch.equal(tied.head.weight, tied.image_emb.weight)


def test_bias_false_drops_every_additive_bias_and_exports(tmp_path):
    from dataclasses import asdict

    from parti.distributed.checkpoint import export_weights
    from parti.models.loading import _load

    with_bias, without = tiny_model(), tiny_model(bias=False).eval()
    biases = {name: p.numel() for name, p in with_bias.named_parameters() if name.endswith(".bias")}
    assert biases and not [n for n, _ in without.named_parameters() if n.endswith(".bias")]
    assert with_bias.num_params(non_embedding=False) - without.num_params(non_embedding=False) == \
        sum(biases.values())
    assert with_bias.flops_per_token() > without.flops_per_token()
    export_weights(tmp_path / "export", without.state_dict(),
                   {"kind": "parti", "model": asdict(without.cfg)})
    loaded, _ = _load(tmp_path / "export", "parti", PartiConfig, Parti, "cpu", "")
    ids, mask, tokens = make_batch([3, 8])
    assert not loaded.cfg.bias
    assert torch.equal(loaded(ids, mask, tokens), without(ids, mask, tokens))


def test_an_export_from_before_kv_heads_and_bias_loads_as_multi_head_with_biases(tmp_path):
    from dataclasses import asdict

    from parti.distributed.checkpoint import export_weights
    from parti.models.loading import _load

    model = tiny_model().eval()
    older = {key: value for key, value in asdict(model.cfg).items()
             if key not in ("kv_heads", "bias")}
    export_weights(tmp_path / "export", model.state_dict(), {"kind": "parti", "model": older})
    loaded, _ = _load(tmp_path / "export", "parti", PartiConfig, Parti, "cpu", "")
    assert loaded.cfg.kv_heads is None and loaded.cfg.bias
    ids, mask, tokens = make_batch([3, 8])
    assert torch.equal(loaded(ids, mask, tokens), model(ids, mask, tokens))


def test_tied_model_exports_loads_and_averages_once(tmp_path):
    from parti.distributed.checkpoint import export_weights, load_export
    from parti.training.ema import EMA

    tied = tiny_model(tie_embeddings=True)
    ema = EMA(tied, decay=0.5)
    with torch.no_grad():
        tied.image_emb.weight.add_(1.0)
    ema.update(tied)  # the shared tensor is blended once: 0.5 * old + 0.5 * (old + 1) = old + 0.5
    shadow = ema.state_dict()
    assert torch.allclose(shadow["head.weight"], tied.head.weight - 0.5)
    assert shadow["head.weight"] is shadow["image_emb.weight"]
    export_weights(tmp_path / "export", tied.state_dict(), {"kind": "parti"})
    weights, _ = load_export(tmp_path / "export")
    fresh = Parti(PartiConfig(**{**TINY, "tie_embeddings": True}))
    fresh.load_state_dict(weights)
    ids, mask, tokens = make_batch([3, 8])
    assert torch.equal(fresh.eval()(ids, mask, tokens), tied.eval()(ids, mask, tokens))
