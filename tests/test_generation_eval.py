"""`python -m parti.eval.generation` and the in-training `eval/judge_*` metrics on a tiny model."""

import json

import pytest

from parti.eval.fid import random_inception_weights
from parti.eval.generation import ATTRIBUTES, SPLITS, judge_means, judge_sums, main
from tests.test_stage2 import build


@pytest.fixture(scope="module")
def tiny_parti(shapes_dir, token_dir, tiny_tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("parti")
    trainer, task = build(shapes_dir, token_dir, tiny_tokenizer, run_dir, steps=2)
    trainer.fit()
    trainer.export(run_dir / "export")
    return run_dir / "export"


def test_judge_sums_split_single_and_two_object_captions():
    from parti.data.shapes import generate

    samples = list(generate(12, seed=3))
    images = [image for _, image, _, _ in samples]
    captions = [caption for _, _, caption, _ in samples]
    means = judge_means(judge_sums(images, captions))
    assert set(means) == set(SPLITS)
    assert means["single"]["all"] == means["two"]["all"] == 1.0  # real images: the judge agrees
    assert "relation" not in means["single"] and "position" not in means["two"]
    sums = judge_sums(images, captions)
    assert sums["single_all_n"] + sums["two_all_n"] == 12


@pytest.mark.slow
def test_generation_eval_writes_every_key(tiny_parti, shapes_dir, tmp_path, capsys):
    weights = random_inception_weights(tmp_path / "inception.pth")
    result = main([f"ckpt={tiny_parti}", f"shards={shapes_dir}/eval-00000.tar", "n=8",
                   "guidance=[1,2]", "candidates=[1,2]", "batch_size=4",
                   f"fid_weights={weights}", f"out={tmp_path / 'gen'}"])
    written = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert {"ckpt", "shards", "n", "captions", "seed", "fid", "rows"} <= set(written)
    assert written["n"] == 8 and sum(written["captions"].values()) == 8
    names = [row["name"] for row in written["rows"]]
    assert names == ["real held-out images", "tokenizer reconstructions", "guidance 1",
                     "guidance 2", "guidance 1, best of 2", "guidance 2, best of 2"]
    for row in written["rows"]:
        assert {"name", "single", "two", "fid", "seconds"} <= set(row)
        assert isinstance(row["fid"], float)
        for split in SPLITS:
            if written["captions"][split]:
                assert {"color", "shape", "all", "count"} <= set(row[split]) <= set(ATTRIBUTES)
    assert written["rows"][0]["single"]["all"] == 1.0 and written["rows"][0]["fid"] < 1e-2
    assert (tmp_path / "gen" / "generation.png").stat().st_size > 0
    table = (tmp_path / "gen" / "generation.md").read_text()
    assert table.startswith("| images |") and "guidance 2, best of 2" in table
    assert table in capsys.readouterr().out


def test_generation_eval_rejects_bad_values(tiny_parti, shapes_dir):
    with pytest.raises(ValueError, match="config error: top_p"):
        main([f"ckpt={tiny_parti}", "top_p=0"])
    with pytest.raises(ValueError, match="config error: guidance: -1.0 must be >= 0"):
        main([f"ckpt={tiny_parti}", "guidance=[1,-1]"])
    with pytest.raises(FileNotFoundError, match="fid_weights='/nowhere.pth'"):
        main([f"ckpt={tiny_parti}", f"shards={shapes_dir}/eval-00000.tar", "n=2",
              "guidance=[1]", "fid_weights=/nowhere.pth"])


def test_training_logs_judge_metrics(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    trainer, _ = build(shapes_dir, token_dir, tiny_tokenizer, tmp_path, steps=2,
                       extra=["eval.n=6", "eval.guidance=[1.0,2.0]", "eval.candidates=2"])
    metrics = trainer.fit()
    for tag in ("g1", "g2", "g1_k2", "g2_k2"):
        judged = {k: v for k, v in metrics.items()
                  if k.startswith("eval/judge_") and k.endswith(f"_{tag}")}
        splits = {k.split("_")[1] for k in judged}
        assert splits and splits <= {"single", "two"}
        for split in splits:
            assert {f"eval/judge_{split}_{a}_{tag}" for a in ("color", "shape", "all")} <= set(judged)
        assert all(0.0 <= v <= 1.0 for v in judged.values())
