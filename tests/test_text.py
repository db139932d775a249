"""SentencePiece tokenizer: training, vocabulary clipping, encode/decode, special ids, pickling."""

import io
import pickle
import random
import tarfile

import pytest
import torch

from parti.text import train as text_train
from parti.text.tokenizer import TextTokenizer
from parti.text.train import train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["at the top left", "at the bottom right", "in the centre", "above a blue square"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a {rng.choice(['small', 'large'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
        f"{rng.choice(PLACES)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    out = tmp_path_factory.mktemp("spm") / "captions"
    return TextTokenizer(train_tokenizer(synthetic_captions(200), out, vocab_size=40))


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 40


def test_round_trip(tokenizer):
    captions = synthetic_captions(20, seed=1)
    ids, mask = tokenizer.encode(captions, max_len=64)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (20, 64)
    assert tokenizer.decode(ids) == captions


def test_bos_eos_padding_and_mask(tokenizer):
    ids, mask = tokenizer.encode(["a red circle", ""], max_len=16)
    length = int(mask[0].sum())
    assert ids[0, 0] == tokenizer.bos_id and ids[0, length - 1] == tokenizer.eos_id
    assert (ids[0, length:] == tokenizer.pad_id).all() and not mask[0, length:].any()
    assert mask[0, :length].all()
    assert ids[1, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id]
    assert mask[1].tolist() == [True, True] + [False] * 14
    assert tokenizer.decode(ids) == ["a red circle", ""]


def test_truncation_keeps_bos_and_ends_with_eos(tokenizer):
    long_caption = " ".join(synthetic_captions(10))
    ids, mask = tokenizer.encode([long_caption], max_len=8)
    assert mask.all()
    assert ids[0, 0] == tokenizer.bos_id and ids[0, -1] == tokenizer.eos_id
    full, _ = tokenizer.encode([long_caption], max_len=512)
    assert torch.equal(ids[0, 1:-1], full[0, 1:7])


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="max_len"):
        tokenizer.encode(["a red circle"], max_len=1)
    with pytest.raises(TypeError, match="list of captions"):
        tokenizer.encode("a red circle", max_len=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode(torch.tensor([[2, 10_000, 3]]))


def test_pickle(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    captions = synthetic_captions(5, seed=2)
    assert torch.equal(clone.encode(captions, 24)[0], tokenizer.encode(captions, 24)[0])


def test_vocab_clipped_on_tiny_corpus(tmp_path):
    path = train_tokenizer(synthetic_captions(200), tmp_path / "tiny", vocab_size=16000)
    vocab = TextTokenizer(path).vocab_size
    assert 30 < vocab < 16000
    assert not list(tmp_path.glob("*.tmp"))


def test_vocab_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="below the .* pieces"):
        train_tokenizer(synthetic_captions(50), tmp_path / "small", vocab_size=10)


def test_missing_model_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m parti.text.train"):
        TextTokenizer(tmp_path / "nope.model")


def _write_caption_shard(path, captions, with_image=True):
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            members = {"txt": caption.encode()}
            if with_image:
                members["jpg"] = b"not read by the trainer"
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cli_trains_on_shard_captions(tmp_path, capsys):
    captions = synthetic_captions(120)
    (tmp_path / "a-0.tar").write_bytes(b"garbage, not a tar")
    _write_caption_shard(tmp_path / "a-1.tar", captions[:60])
    _write_caption_shard(tmp_path / "a-2.tar", captions[60:])
    out = tmp_path / "spm" / "model"
    path = text_train.main(
        ["--shards", f"{tmp_path}/a-{{0..2}}.tar", "--out", str(out), "--max-samples", "100"]
    )
    line = capsys.readouterr().out
    assert path == out.with_suffix(".model") and path.is_file()
    assert "(asked 16000)" in line and "100 captions" in line and "1 unreadable" in line
    tok = TextTokenizer(path)
    assert tok.decode(tok.encode(captions[:3], 64)[0]) == captions[:3]


def test_cli_missing_shards_error(tmp_path):
    with pytest.raises(SystemExit):
        text_train.main(["--shards", f"{tmp_path}/none-{{0..1}}.tar", "--out", str(tmp_path / "m")])
