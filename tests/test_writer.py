"""Shard writer: sources, round trips through the shard reader, resumability, skip counts."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from parti.data import write
from parti.data.shards import iter_raw_samples
from parti.data.transforms import TokenDecoder


def image_bytes(colour: tuple[int, int, int], fmt: str, size=(12, 8)) -> bytes:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[...] = colour
    array[0, 0] = (1, 2, 3)  # one odd pixel, so a lossless round trip is checked for position too
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_all(out) -> list[dict]:
    return list(iter_raw_samples(sorted(str(p) for p in out.glob("*.tar"))))


@pytest.fixture()
def folder(tmp_path):
    """5 images (png and jpg, nested), captions for 4 of them."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.png": (255, 0, 0),
        "b.jpg": (0, 255, 0),
        "sub/c.png": (0, 0, 255),
        "sub/d.PNG": (9, 9, 9),
        "e.png": (200, 100, 0),
    }
    for name, colour in files.items():
        fmt = "JPEG" if name.endswith("jpg") else "PNG"
        (root / name).write_bytes(image_bytes(colour, fmt))
        if name != "e.png":
            (root / name).with_suffix(".txt").write_text(f"  caption of {name}\n")
    return root


def test_from_folder_round_trip(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    summary = write.main(["--from-folder", str(folder), "--out", str(out), "--per-shard", "2"])
    assert capsys.readouterr().out.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{i:05d}.tar" for i in range(3)]
    assert (summary.shards_written, summary.samples) == (3, 4)
    assert summary.skipped == {"missing_caption": 1}
    samples = {s["txt"].decode(): s for s in read_all(out)}
    assert set(samples) == {f"caption of {n}" for n in ["a.png", "b.jpg", "sub/c.png", "sub/d.PNG"]}
    png = samples["caption of a.png"]["png"]
    assert png == (folder / "a.png").read_bytes()
    assert np.array_equal(pixels(png), pixels(image_bytes((255, 0, 0), "PNG")))
    assert samples["caption of b.jpg"]["jpg"] == (folder / "b.jpg").read_bytes()
    assert "png" in samples["caption of sub/d.PNG"]
    assert json.loads(samples["caption of sub/c.png"]["json"]) == {"source": "sub/c.png"}


def test_from_csv_with_columns_and_missing_image(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(image_bytes((1, 2, 3), "PNG"))
    (tmp_path / "img" / "y.webp").write_bytes(image_bytes((4, 5, 6), "WEBP"))
    listing = tmp_path / "pairs.csv"
    listing.write_text(
        'path,text,licence\nimg/x.png,"a red, round thing",cc0\nimg/gone.png,lost,cc0\n'
        f"{tmp_path}/img/y.webp,absolute path,cc-by\n"
    )
    out = tmp_path / "out"
    args = ["--from-list", str(listing), "--image-col", "path", "--caption-col", "text"]
    summary = write.main([*args, "--out", str(out)])
    assert summary.skipped == {"missing_image": 1} and summary.samples == 2
    samples = read_all(out)
    assert [s["txt"] for s in samples] == [b"a red, round thing", b"absolute path"]
    assert samples[0]["png"] == (tmp_path / "img" / "x.png").read_bytes()
    assert "webp" in samples[1]
    assert json.loads(samples[1]["json"])["licence"] == "cc-by"
    assert [s["__key__"] for s in samples] == ["000000000", "000000002"]


def test_from_jsonl_and_tsv(tmp_path):
    (tmp_path / "x.jpg").write_bytes(image_bytes((7, 7, 7), "JPEG"))
    rows = [{"image": "x.jpg", "caption": "seven"}, {"image": "x.jpg", "caption": None}]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "l.tsv").write_text("image\tcaption\nx.jpg\ttab separated\n")
    jsonl = write.main(["--from-list", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "j")])
    assert jsonl.skipped == {"missing_caption": 1}
    assert [s["txt"] for s in read_all(tmp_path / "j")] == [b"seven"]
    write.main(["--from-list", str(tmp_path / "l.tsv"), "--out", str(tmp_path / "t")])
    assert [s["txt"] for s in read_all(tmp_path / "t")] == [b"tab separated"]


def test_blank_captions_are_skipped_as_missing(tmp_path):
    for name, caption in [("blank", " \n"), ("empty", ""), ("kept", "a caption")]:
        (tmp_path / f"{name}.png").write_bytes(image_bytes((1, 2, 3), "PNG"))
        (tmp_path / f"{name}.txt").write_text(caption)
    folder = write.main(["--from-folder", str(tmp_path), "--out", str(tmp_path / "f")])
    assert folder.skipped == {"missing_caption": 2} and folder.samples == 1
    rows = [{"image": f"{name}.png", "caption": c} for name, c in [("kept", "ok"), ("blank", "\t ")]]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "l.csv").write_text("image,caption\nkept.png,ok\nblank.png,\nempty.png,  \n")
    for listing, blanks in [("l.jsonl", 1), ("l.csv", 2)]:
        out = tmp_path / listing.replace(".", "_")
        summary = write.main(["--from-list", str(tmp_path / listing), "--out", str(out)])
        assert summary.skipped == {"missing_caption": blanks} and summary.samples == 1
        assert [s["txt"] for s in read_all(out)] == [b"ok"]


def test_list_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "l.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(SystemExit):
        write.main(["--from-list", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o")])
    assert "no column 'image' (columns: file, caption)" in capsys.readouterr().err
    (tmp_path / "l.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{broken\n')
    with pytest.raises(ValueError, match=r"l.jsonl:2: invalid JSON"):
        write.write_shards(write.list_source(tmp_path / "l.jsonl"), tmp_path / "o")


def test_resume_keeps_complete_shards(folder, tmp_path):
    out = tmp_path / "shards"
    args = ["--from-folder", str(folder), "--out", str(out), "--per-shard", "2"]
    write.main(args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = write.main(args)
    assert (again.shards_written, again.shards_kept, again.samples) == (0, 3, 0)
    (out / "shard-00001.tar").unlink()
    (out / "shard-00002.tar.tmp").write_bytes(b"left over by a killed run")
    calls = []

    def counting_source(start):
        calls.append(start)
        return write.folder_source(folder)(start)

    summary = write.write_shards(counting_source, out, per_shard=2)
    assert (summary.shards_written, summary.shards_kept, summary.samples) == (1, 2, 1)
    assert summary.skipped == {"missing_caption": 1}  # e.png, sorted into shard 1
    assert calls == [2, 6]  # shard 1's items, then one look past the last shard
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_generic_samples_token_shards(tmp_path):
    tokens = np.arange(16, dtype=np.int16).reshape(4, 4)

    def token_samples(start):
        for i in range(start, 3):
            yield {"__key__": f"k{i}", "tokens.npy": tokens + i, "txt": f"caption {i}"}

    summary = write.write_shards(token_samples, tmp_path, per_shard=2, prefix="tok")
    assert summary.shards_written == 2 and summary.samples == 3
    decode = TokenDecoder(grid=4, codebook_size=18)
    decoded = [decode(raw, np.random.default_rng(0)) for raw in read_all(tmp_path)]
    assert [d["caption"] for d in decoded] == ["caption 0", "caption 1", "caption 2"]
    assert decoded[2]["tokens"].tolist() == list(range(2, 18))
    assert decoded[2]["tokens"].dtype.is_floating_point is False


def test_bad_sample_dicts():
    with pytest.raises(ValueError, match="without dots"):
        write.encode_sample({"__key__": "a.b", "txt": "x"})
    with pytest.raises(TypeError, match="cannot write float as .txt"):
        write.encode_sample({"__key__": "a", "txt": 1.5})


def test_from_shapes_resumes_with_start(tmp_path):
    pytest.importorskip("parti.data.shapes")
    out = tmp_path / "shapes"
    args = ["--from-shapes", "5", "--seed", "3", "--size", "16", "--out", str(out)]
    first = write.main([*args, "--per-shard", "2"])
    assert (first.shards_written, first.samples) == (3, 5)
    before = (out / "shard-00001.tar").read_bytes()
    (out / "shard-00001.tar").unlink()
    second = write.main([*args, "--per-shard", "2"])
    assert (second.shards_written, second.samples) == (1, 2)
    assert (out / "shard-00001.tar").read_bytes() == before
    samples = read_all(out)
    assert len(samples) == 5 and all(pixels(s["png"]).shape == (16, 16, 3) for s in samples)
