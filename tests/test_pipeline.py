"""Shard pipeline: skipping and counting bad input, splitting, determinism, exact resume, eval."""

import copy
import io
import itertools
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from parti.data.eval_loader import build_eval_loader
from parti.data.pipeline import build_train_loader
from parti.data.shards import SampleRng, SkipSample, expand_urls
from parti.data.transforms import ImageDecoder, TokenDecoder, to_tensor, to_uint8

DECODE = ImageDecoder(8, train=True)


def noise_image(seed: int, fmt: str = "PNG", size=(12, 10)) -> bytes:
    """A small random image: crops at different offsets differ."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good(key: str, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", noise_image(seed)), (f"{key}.txt", f"caption {key}".encode())]


def good_shards(tmp_path, n_shards: int, per_shard: int, name: str = "s") -> list[str]:
    """Shards of good samples; keys say where they came from: s{shard}_{index}."""
    return [
        write_tar(
            tmp_path / f"{name}-{s:03d}.tar",
            [m for i in range(per_shard) for m in good(f"{name}{s}_{i}", 1000 * s + i)],
        )
        for s in range(n_shards)
    ]


def truncated_shard(path, cut_in: str = "t2.png") -> tuple[str, list[str]]:
    """A 4-sample tar cut inside member `cut_in`; returns it and its readable keys.

    Cut inside t2: t0 comes out; t1 is lost too, as its group is only known to be complete
    when the next key starts.
    """
    write_tar(path, [m for i in range(4) for m in good(f"t{i}", 500 + i)])
    with tarfile.open(path) as tar:
        cut = tar.getmember(cut_in).offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    return str(path), ["t0"]


def bad_samples_shard(path) -> tuple[str, list[str]]:
    """Good samples between a truncated jpg, garbage png, a caption-less and an image-less one."""
    jpg = noise_image(7, "JPEG", (64, 64))
    members = [
        *good("g0", 1),
        ("b_trunc.jpg", jpg[: len(jpg) // 2]),
        ("b_trunc.txt", b"truncated jpeg"),
        *good("g1", 2),
        ("b_garbage.png", b"\x89PNG but not really an image"),
        ("b_garbage.txt", b"garbage png"),
        ("b_nocap.png", noise_image(3)),
        *good("g2", 4),
        ("b_noimg.txt", b"caption without an image"),
        ("b_noimg.json", b"{}"),
    ]
    return write_tar(path, members), ["g0", "g1", "g2"]


BAD_REASONS = {"corrupt_image": 2, "missing_caption": 1, "missing_image": 1}


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_expand_urls():
    assert expand_urls("a/{0..2}.tar") == ["a/0.tar", "a/1.tar", "a/2.tar"]
    assert expand_urls("a/{0..1}.tar :: b.tar") == ["a/0.tar", "a/1.tar", "b.tar"]
    assert expand_urls(["x{1,2}.tar", "pipe:cat y.tar"]) == ["x1.tar", "x2.tar", "pipe:cat y.tar"]
    with pytest.raises(ValueError, match="no shards"):
        expand_urls(" :: ")
    with pytest.raises(TypeError, match="must be strings"):
        expand_urls(["a.tar", 3])


def test_eval_skips_bad_input_with_exact_counts(tmp_path):
    bad, bad_keys = bad_samples_shard(tmp_path / "bad.tar")
    trunc, trunc_keys = truncated_shard(tmp_path / "trunc.tar")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)
    loader = build_eval_loader([bad, trunc, str(garbage)], DECODE, batch_size=2)
    assert sorted(keys_of(loader)) == sorted(bad_keys + trunc_keys)
    assert loader.skipped == {**BAD_REASONS, "bad_shard": 2}


def test_train_skips_bad_input_with_exact_counts(tmp_path):
    bad, bad_keys = bad_samples_shard(tmp_path / "bad.tar")
    loader = build_train_loader(
        bad, DECODE, batch_size=3, seed=0, shards_per_block=1, shuffle_buffer=1
    )
    batches = list(itertools.islice(loader, 2))
    # One shard, no shuffle: each block is the shard in order, the batch ends at its last good one.
    assert keys_of(batches) == bad_keys * 2
    # The image-less sample after g2 of the second block is not read yet.
    assert loader.skipped == {"corrupt_image": 4, "missing_caption": 2, "missing_image": 1}
    assert batches[0]["image"].shape == (3, 3, 8, 8)
    assert batches[0]["caption"] == ["caption g0", "caption g1", "caption g2"]


def test_train_counts_bad_shards_and_keeps_going(tmp_path):
    shards = good_shards(tmp_path, 2, 3)
    trunc, _ = truncated_shard(tmp_path / "trunc.tar")
    loader = build_train_loader([*shards, trunc], DECODE, batch_size=4, seed=1)
    batches = list(itertools.islice(loader, 10))
    assert all(key.startswith(("s", "t0")) for key in keys_of(batches))
    assert set(loader.skipped) == {"bad_shard"} and loader.skipped["bad_shard"] > 0


def test_all_bad_shards_raise_instead_of_hanging(tmp_path):
    trunc, _ = truncated_shard(tmp_path / "trunc.tar", cut_in="t0.png")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\0garbage" * 100)
    empty = write_tar(tmp_path / "empty.tar", [])
    loader = build_train_loader([trunc, str(garbage), empty], DECODE, batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="no valid samples in shards .*garbage.tar"):
        next(iter(loader))


def test_too_many_consecutive_skips_raise(tmp_path):
    shard = write_tar(
        tmp_path / "corrupt.tar",
        [m for i in range(5) for m in [(f"c{i}.png", b"not a png"), (f"c{i}.txt", b"x")]],
    )
    loader = build_train_loader(shard, DECODE, batch_size=2, seed=0, max_consecutive_skips=12)
    with pytest.raises(RuntimeError, match=r"no valid samples in shards .*corrupt.tar.*12 samples"):
        next(iter(loader))


def test_decode_skip_reason_is_counted(tmp_path):
    shards = good_shards(tmp_path, 1, 4)

    def picky(raw, rng):
        if raw["__key__"].endswith("_0"):
            raise SkipSample("too_boring")
        return DECODE(raw, rng)

    loader = build_eval_loader(shards, picky, batch_size=8)
    assert len(keys_of(loader)) == 3 and loader.skipped == {"too_boring": 1}


def test_too_few_shards_is_a_value_error_with_numbers(tmp_path):
    shards = good_shards(tmp_path, 3, 1)
    with pytest.raises(ValueError, match=r"3 shards < 2 ranks x 2 workers = 4 readers"):
        build_train_loader(shards, DECODE, batch_size=1, seed=0, world_size=2, num_workers=2)


def test_missing_shard_files_are_named(tmp_path):
    shards = good_shards(tmp_path, 1, 1)
    with pytest.raises(FileNotFoundError, match="1 of 2 shards do not exist: .*nope.tar"):
        build_train_loader([*shards, str(tmp_path / "nope.tar")], DECODE, batch_size=1, seed=0)


def test_train_split_is_disjoint_and_covers_all_shards(tmp_path):
    shards = good_shards(tmp_path, 8, 2)
    world, workers = 2, 2
    seen: dict[tuple[int, int], set[int]] = {}
    for rank in range(world):
        loader = build_train_loader(
            shards, DECODE, batch_size=2, seed=0, rank=rank, world_size=world, num_workers=workers
        )
        for i, batch in enumerate(itertools.islice(loader, 24)):
            shard_ids = {int(key[1:].split("_")[0]) for key in batch["key"]}
            seen.setdefault((rank, i % workers), set()).update(shard_ids)
    for (rank, worker), ids in seen.items():
        g = rank * workers + worker
        assert ids <= set(range(8)[g :: world * workers])
    assert sorted(i for ids in seen.values() for i in ids) == list(range(8))


def test_order_is_deterministic_and_depends_on_seed_and_rank(tmp_path):
    shards = good_shards(tmp_path, 4, 6)

    def first(seed, rank=0, world=1):
        loader = build_train_loader(
            shards, DECODE, batch_size=4, seed=seed, rank=rank, world_size=world, shuffle_buffer=8
        )
        return list(itertools.islice(loader, 5))

    a, b = first(seed=0), first(seed=0)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert keys_of(first(seed=1)) != keys_of(a)
    rank0, rank1 = keys_of(first(0, 0, 2)), keys_of(first(0, 1, 2))
    assert not set(rank0) & set(rank1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(tmp_path, num_workers):
    shards = good_shards(tmp_path, 6, 7)
    bad, _ = bad_samples_shard(tmp_path / "bad.tar")
    trunc, _ = truncated_shard(tmp_path / "trunc.tar")
    urls = [*shards, bad, trunc]
    settings = dict(
        batch_size=3, seed=5, num_workers=num_workers, shards_per_block=2, shuffle_buffer=5
    )
    k, more = 7, 9

    uninterrupted = build_train_loader(urls, DECODE, **settings)
    reference = list(itertools.islice(uninterrupted, k + more))

    first = build_train_loader(urls, DECODE, **settings)
    consumed = list(itertools.islice(first, k))
    state = json.loads(json.dumps(first.state_dict()))  # plain python types only
    resumed = build_train_loader(urls, DECODE, **settings, state=state)
    assert resumed.skipped == first.skipped
    continued = list(itertools.islice(resumed, more))

    for got, want in zip(consumed + continued, reference, strict=True):
        assert got["key"] == want["key"]
        assert torch.equal(got["image"], want["image"])
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert sum(uninterrupted.skipped.values()) > 0


def test_resume_at_every_position_counts_each_skip_once(tmp_path):
    shards = good_shards(tmp_path, 2, 5)
    bad, _ = bad_samples_shard(tmp_path / "bad.tar")
    trunc, _ = truncated_shard(tmp_path / "trunc.tar")
    urls = [*shards, bad, trunc]
    settings = dict(batch_size=2, seed=11, shards_per_block=4, shuffle_buffer=3)
    reference = build_train_loader(urls, DECODE, **settings)
    states = []
    for batch in itertools.islice(reference, 16):
        states.append((batch["key"], reference.state_dict()))
    mid_block_after_bad_shard = 0
    for k in range(1, 15):
        resumed = build_train_loader(urls, DECODE, **settings, state=states[k - 1][1])
        for keys, state in states[k : k + 2]:
            assert next(iter(resumed))["key"] == keys
            assert resumed.state_dict() == state
        worker = states[k - 1][1]["workers"][0]
        mid_block_after_bad_shard += worker["offset"] > 0 and worker["skipped"].get("bad_shard", 0)
    assert mid_block_after_bad_shard > 0


def test_new_iter_continues_where_the_last_stopped(tmp_path):
    shards = good_shards(tmp_path, 2, 5)
    settings = dict(batch_size=2, seed=3, shards_per_block=2, shuffle_buffer=3)
    reference = keys_of(itertools.islice(build_train_loader(shards, DECODE, **settings), 8))
    loader = build_train_loader(shards, DECODE, **settings)
    assert keys_of(itertools.islice(loader, 3)) + keys_of(itertools.islice(loader, 5)) == reference


def test_state_from_other_settings_is_refused(tmp_path):
    shards = good_shards(tmp_path, 2, 2)
    loader = build_train_loader(shards, DECODE, batch_size=2, seed=0)
    next(iter(loader))
    with pytest.raises(ValueError, match="readers_per_rank: saved 1 now 2"):
        build_train_loader(
            shards, DECODE, batch_size=2, seed=0, num_workers=2, state=loader.state_dict()
        )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_reads_each_sample_once_across_ranks(tmp_path, num_workers):
    shards = good_shards(tmp_path, 5, 3)
    shards.append(f"pipe:cat {good_shards(tmp_path, 1, 2, name='p')[0]}")
    all_keys = [f"s{s}_{i}" for s in range(5) for i in range(3)] + ["p0_0", "p0_1"]
    keys = []
    for rank in range(2):
        loader = build_eval_loader(
            shards, DECODE, batch_size=2, rank=rank, world_size=2, num_workers=num_workers
        )
        passes = [keys_of(loader), keys_of(loader)]
        assert passes[0] == passes[1]
        keys += passes[0]
    assert sorted(keys) == sorted(all_keys)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_one_eval_tar_gives_every_world_size_the_same_samples(tmp_path, world_size):
    """The README's recipe has a single eval tar: every rank must get a share of it, and the
    first max_samples samples must be the evaluated set whatever the number of ranks."""
    shard = good_shards(tmp_path, 1, 7)
    per_rank = [keys_of(build_eval_loader(shard, DECODE, batch_size=2, rank=r,
                                          world_size=world_size, max_samples=5))
                for r in range(world_size)]
    assert all(per_rank), f"a rank got no eval samples: {per_rank}"
    assert sorted(k for keys in per_rank for k in keys) == [f"s0_{i}" for i in range(5)]


def test_text_named_jpg_and_an_empty_tar_are_counted(tmp_path):
    shard = write_tar(tmp_path / "odd.tar", [*good("g0", 1), ("t.jpg", b"just some text"),
                                             ("t.txt", b"text named jpg")])
    empty = write_tar(tmp_path / "empty.tar", [])
    loader = build_eval_loader([shard, empty], DECODE, batch_size=2)
    assert keys_of(loader) == ["g0"]
    assert loader.skipped == {"corrupt_image": 1, "empty_shard": 1}


def test_eval_skips_are_counted_once_across_ranks(tmp_path):
    bad, bad_keys = bad_samples_shard(tmp_path / "bad.tar")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)
    totals, keys = {}, []
    for rank in range(2):
        loader = build_eval_loader([bad, str(garbage)], DECODE, batch_size=2, rank=rank,
                                   world_size=2)
        keys += keys_of(loader)
        for reason, n in loader.skipped.items():
            totals[reason] = totals.get(reason, 0) + n
    assert sorted(keys) == sorted(bad_keys)
    assert totals == {**BAD_REASONS, "bad_shard": 1}


def test_eval_reader_without_samples_yields_nothing(tmp_path):
    shards = good_shards(tmp_path, 1, 3)
    assert keys_of(build_eval_loader(shards, DECODE, batch_size=2, rank=3, world_size=4)) == []
    batches = list(build_eval_loader(shards, DECODE, batch_size=2))
    assert [len(b["key"]) for b in batches] == [2, 1]


def test_image_decoder_resize_and_crops():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    raw = {"__key__": "k", "png": buffer.getvalue(), "txt": b" a caption \n"}
    centre = ImageDecoder(10, train=False)(raw, rng)
    assert centre["caption"] == "a caption" and centre["key"] == "k"
    assert torch.equal(to_uint8(centre["image"]), torch.from_numpy(array[:, 3:13]))
    crops = {
        tuple(ImageDecoder(10, train=True)(raw, rng)["image"][0, 0, :2].tolist()) for _ in range(20)
    }
    assert len(crops) > 1
    small = ImageDecoder(5, train=False)(raw, rng)["image"]
    assert small.shape == (3, 5, 5) and small.min() >= -1 and small.max() <= 1
    assert torch.equal(to_uint8(to_tensor(array)), torch.from_numpy(array))


def test_image_decoder_applies_exif_rotation_and_palette_transparency():
    array = np.zeros((10, 16, 3), np.uint8)
    array[:, 8:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif)
    raw = {"__key__": "r", "jpg": buffer.getvalue(), "txt": b"rotated"}
    image = to_uint8(ImageDecoder(10, train=False)(raw, np.random.default_rng(0))["image"])
    assert image[:4].float().mean() < 30 and image[-4:].float().mean() > 225  # now top/bottom

    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=b"\x00\x80")  # per-entry alpha
    raw = {"__key__": "p", "png": buffer.getvalue(), "txt": b"palette"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = to_uint8(ImageDecoder(6, train=False)(raw, np.random.default_rng(0))["image"])
    assert image[0, 0].tolist() == [255, 0, 0]


def npy_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def _v1_header_of(literal: bytes) -> bytes:
    """The length field and padded header of a version 1.0 .npy file holding `literal`."""
    header = literal + b" " * (-(len(literal) + 11) % 64) + b"\n"
    return len(header).to_bytes(2, "little") + header


def test_token_decoder_reads_what_np_load_reads_and_skips_the_rest():
    decode = TokenDecoder(grid=4, codebook_size=16)
    arrays = [np.arange(16, dtype=np.int16), np.arange(16, dtype=np.int32).reshape(4, 4),
              np.asfortranarray(np.arange(16, dtype=np.int64).reshape(4, 4)),
              np.arange(16, dtype=np.uint8), np.arange(16, dtype=">i4")]
    version_2 = io.BytesIO()
    np.lib.format.write_array(version_2, np.arange(16, dtype=np.int32), version=(2, 0))
    for data in [npy_bytes(array) for array in arrays] + [version_2.getvalue()]:
        raw = {"__key__": "k", "tokens.npy": data, "txt": b" a caption "}
        sample = decode(raw, SampleRng([0]))
        expected = np.load(io.BytesIO(data)).astype(np.int64).reshape(-1)
        assert sample["tokens"].tolist() == expected.tolist(), data[:80]
        assert sample["tokens"].dtype == torch.int64 and sample["caption"] == "a caption"
    good = npy_bytes(np.arange(16, dtype=np.int16))
    bad = {"truncated data": good[:-2], "truncated header": good[:40], "not npy": b"tokens" * 20,
           "floats": npy_bytes(np.ones(16)), "objects": npy_bytes(np.array([{}]), allow_pickle=True),
           "empty": b"", "negative shape": good.replace(b"(16,)", b"(-4,)"),
           "no tokens": npy_bytes(np.zeros(0, np.int16)),
           "version 2.1": good[:7] + b"\x01" + good[8:],
           "nested header": good[:8] + _v1_header_of(b"{'descr': " + b"-" * 5000 + b"1}")}
    for what, data in bad.items():
        with pytest.raises(SkipSample) as skipped:
            decode({"__key__": "k", "tokens.npy": data, "txt": b"c"}, SampleRng([0]))
        assert skipped.value.reason == "corrupt_tokens", what
    with pytest.raises(SkipSample, match="missing_tokens"):
        decode({"__key__": "k", "txt": b"c"}, SampleRng([0]))


def test_token_samples_of_wrong_shape_dtype_or_values_are_skipped_as_corrupt(tmp_path):
    tokens = np.arange(4, dtype=np.int16)  # a 2x2 grid, codebook of 4
    good = {"g0": tokens, "g1": tokens[::-1], "g2": tokens.reshape(2, 2)}  # (2, 2): a grid
    bad = {"short": tokens[:3], "long": np.arange(5, dtype=np.int16), "ndim": tokens[None, :, None],
           "not the grid": tokens.reshape(1, 4), "negative": tokens - 1, "too large": tokens + 1,
           "float": tokens.astype(np.float32), "bool": np.ones(4, bool)}
    members = [m for i, (key, array) in enumerate([*good.items(), *bad.items()]) for m in
               ((f"{i:02d}.tokens.npy", npy_bytes(array)), (f"{i:02d}.txt", key.encode()))]
    loader = build_eval_loader(write_tar(tmp_path / "tokens.tar", members),
                               TokenDecoder(grid=2, codebook_size=4), batch_size=2)
    batches = list(loader)
    assert [c for b in batches for c in b["caption"]] == ["g0", "g1", "g2"]
    assert loader.skipped == {"corrupt_tokens": len(bad)}
    assert torch.cat([b["tokens"] for b in batches]).tolist() == [[0, 1, 2, 3], [3, 2, 1, 0],
                                                                    [0, 1, 2, 3]]


def test_blank_captions_are_skipped_as_missing(tmp_path):
    members = [*good("g0", 1), ("b0.png", noise_image(2)), ("b0.txt", b""),
               ("b1.png", noise_image(3)), ("b1.txt", b" \n\t "), *good("g1", 4)]
    loader = build_eval_loader(write_tar(tmp_path / "blank.tar", members), DECODE, batch_size=2)
    assert keys_of(loader) == ["g0", "g1"]
    assert loader.skipped == {"missing_caption": 2}
    tokens = {"__key__": "k", "tokens.npy": npy_bytes(np.zeros(4, np.int16)), "txt": b"  "}
    with pytest.raises(SkipSample, match="missing_caption"):
        TokenDecoder(grid=2, codebook_size=4)(tokens, SampleRng([0]))


def test_sample_rng_draws_as_its_seed_and_only_when_used():
    lazy, eager = SampleRng([3, 0, 1, 7]), np.random.default_rng([3, 0, 1, 7])
    assert lazy._rng is None  # a decoder that draws nothing never pays for seeding
    assert lazy.integers(100, size=5).tolist() == eager.integers(100, size=5).tolist()
    assert lazy.random() == eager.random()  # one generator, made once, continues its stream
    copied = copy.deepcopy(SampleRng([1]))
    assert copied.integers(10**9) == np.random.default_rng([1]).integers(10**9)
