"""Token shard names: one output per input shard, and a clear error when two inputs share one."""

from pathlib import Path

import pytest

from parti.data.tokenize import main as tokenize
from parti.data.tokenize import output_paths


def test_outputs_keep_the_input_file_names(tmp_path):
    urls = ["data/shapes/train-00000.tar", "/data/shards/00001.tar", "pipe:cat /d/00002.tar"]
    assert output_paths(urls, tmp_path) == [tmp_path / n for n in
                                            ("train-00000.tar", "00001.tar", "00002.tar")]


def test_inputs_of_the_same_name_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "tokens"
    shards = "a/{00000..00002}.tar::b/{00001..00003}.tar"
    # The tokenizer does not exist: the error must come before it is loaded or anything written.
    with pytest.raises(SystemExit):
        tokenize(["--shards", shards, "--tokenizer", str(tmp_path / "none"), "--out", str(out)])
    err = capsys.readouterr().err
    assert f"input shards a/00001.tar and b/00001.tar would both be written to {out}/00001.tar" in err
    assert "into its own --out folder" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="list each shard once"):
        output_paths(["x/0.tar", "x/0.tar"], Path("out"))
