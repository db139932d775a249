"""bench/ at toy sizes: every row of the `make bench` table is there with positive numbers; a new
run keeps the results file's hand-written notes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stage2, throughput  # noqa: E402
from bench.compare import Plan, notes_of, report, run  # noqa: E402
from bench.profile import by_kind, kind_table, split_by_kind  # noqa: E402

COMMON = ["data.num_workers=0", "data.shuffle_buffer=32", "trainer.micro_batch=4",
          "trainer.global_batch=4"]
VQGAN = ["data.image_size=32", "model.image_size=32", "model.patch_size=8", "model.enc_dim=32",
         "model.enc_layers=1", "model.enc_heads=2", "model.enc_mlp_dim=64", "model.dec_dim=32",
         "model.dec_layers=1", "model.dec_heads=2", "model.dec_mlp_dim=64",
         "model.codebook_size=64", "model.code_dim=8", "model.disc.channels=4",
         "model.disc.max_channels=8"]
PARTI = ["model.vocab_size=128", "model.text_len=24", "model.codebook_size=64",
         "model.image_grid=4", "model.dim=32", "model.heads=2", "model.mlp_dim=64",
         "model.enc_layers=1", "model.dec_layers=1"]


def test_every_row_at_toy_size(shapes_dir):
    pytest.importorskip("parti_pytorch")  # the peer: pip install -e '.[bench]'
    plan = Plan.tiny(f"{shapes_dir}/train-{{00000..00003}}.tar", f"{shapes_dir}/text.model",
                     COMMON + VQGAN, COMMON + PARTI)
    rows, info = run(plan)
    stage2 = [row.work for row in rows if row.section == "2"]
    # per size: ours and ours in the peer's layout (compile is off at toy size)
    assert sum(w.startswith("train") and "MFU" not in w for w in stage2) == 4
    assert sum(w.endswith("MFU") for w in stage2) == 2
    assert sum(w.startswith("sample") for w in stage2) == 4
    assert sum("1 KV head, no biases (as the peer), eager" in w for w in stage2) == 4
    assert sum(row.section == "1" for row in rows) == 2
    assert sum(row.section == "loop" for row in rows) == 4
    for row in rows:
        assert row.ref > 0 and row.ours > 0, row
    assert info["matmul_gflops"] > 0
    table = report(rows, info)
    assert table.count("\n| ") == len(rows)


def test_a_new_run_keeps_the_notes_below_the_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    assert notes_of(results) == ""
    notes = "\n## Where the time goes\n\nProfiles.\n"
    results.write_text("# Benchmark results\n\n| old | table |\n" + notes)
    assert notes_of(results) == notes
    results.write_text("# Benchmark results\n\n| no | notes |\n")
    assert notes_of(results) == ""


def test_trainer_step_throughput_plain_and_fsdp(tmp_path):
    # The prepared GPU run (python -m bench.throughput) at tiny size on the CPU, compile off.
    table = throughput.main(["--model", "parti_tiny", "--batch", "2", "--steps", "1",
                             "--compile", "off"])
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ddp")
            or line.startswith("| fsdp")]
    assert [r[0].strip() for r in rows] == ["ddp", "fsdp"]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)  # image tokens/s


@dataclass
class Event:
    """The fields of torch's profiler FunctionEvent that `split_by_kind` reads (times in us)."""

    name: str
    self_cpu_time_total: float
    cpu_time_total: float = 0.0
    flops: int = 0
    cpu_parent: Event | None = None


def test_split_by_kind_counts_each_op_once():
    linear = Event("aten::linear", 5, 105)
    step = Event("Optimizer.step#AdamW.step", 4, 60)
    events = [linear, Event("aten::mm", 100, 100, 2_000, linear),
              Event("aten::addmm", 50, 50, 1_000),
              Event("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 30, 40),
              step, Event("aten::_fused_adamw_", 26, 26, cpu_parent=step),
              Event("aten::mm", 10, 10, 500, step),  # inside the optimizer: the optimizer's
              Event("Optimizer.step#Inner.step", 20, 20, cpu_parent=step),
              Event("Optimizer.zero_grad#AdamW.zero_grad", 6, 6), Event("aten::gelu", 70, 70)]
    kinds = split_by_kind(events, calls=2)
    assert kinds == pytest.approx({"matmul": 75e-6, "matmul_flops": 1_500, "attention": 15e-6,
                                   "optimizer": 33e-6})


def test_step_time_by_kind_counts_the_matmul_flops_of_a_real_step():
    size = stage2.Size(dim=32, dec_layers=1, heads=2, codebook_size=64, text_len=8, vocab_size=64)
    step = stage2.our_train_step(size, grid=2, batch=2)["ours"]
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    counts = counter.get_flop_counts()["Global"]
    matmul_flops = sum(n for op, n in counts.items() if op.__name__.startswith(("mm", "addmm")))
    assert matmul_flops > 0
    kinds = by_kind(step, calls=2, matmul_rate=1e11)
    assert kinds["matmul_flops"] == pytest.approx(matmul_flops)
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and kinds["optimizer"] > 0
    assert kinds["floor"] > matmul_flops / 1e11
    table = kind_table(kinds, 1e11)
    assert f"{matmul_flops / 1e9:.2f} GFLOP" in table and "floor" in table
