"""SIGKILL at random moments (mid-step or mid-checkpoint), then the same command again: the run
resumes from the newest complete checkpoint and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_vqgan_overrides

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24
KILLS = 3


def command(shapes_dir: Path, run_dir: Path, ranks: int) -> list[str]:
    overrides = [o for o in tiny_vqgan_overrides(shapes_dir, run_dir, STEPS)
                 if not o.startswith(("trainer.ckpt_every=", "trainer.micro_batch="))]
    overrides += ["trainer.ckpt_every=1", "trainer.keep_last=2", "trainer.precision=fp32",
                  f"trainer.micro_batch={8 // ranks}", "trainer.ema_decay=0.9"]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return launcher + ["train_vqgan.py", *overrides]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def newest_step(run_dir: Path) -> int:
    ckpts = run_dir / "checkpoints"
    done = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "COMPLETE").is_file()]
    return max(done, default=0)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun's workers run in their own process groups, so
    killing torchrun's group would leave them running)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                              text=True).stdout.split()
    return [pid] + [d for child in children for d in process_tree(int(child))]


def kill_once_training(args: list[str], run_dir: Path, rng: random.Random) -> bool:
    """Start the command; after 1-4 new checkpoints plus a random delay (mid-step or mid-save),
    SIGKILL it and every process it started. False when the run finished first."""
    target = newest_step(run_dir) + rng.randint(1, 4)
    proc = start(args)
    deadline = time.monotonic() + 300
    while newest_step(run_dir) < target and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    if proc.poll() is not None:
        return False
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return True


def finish(args: list[str]) -> None:
    proc = start(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_killed_runs_resume_to_the_uninterrupted_weights(shapes_dir, tmp_path, ranks):
    straight = tmp_path / "straight"
    finish(command(shapes_dir, straight, ranks))
    killed = tmp_path / "killed"
    args = command(shapes_dir, killed, ranks)
    rng = random.Random(ranks)
    kills = sum(kill_once_training(args, killed, rng) for _ in range(KILLS))
    assert kills == KILLS, f"only {kills} of {KILLS} runs were killed before they finished"
    finish(args)
    starts = (killed / "train.log").read_text().count("| start step ")
    assert starts == KILLS + 1
    a = load_file(str(straight / "export" / "model.safetensors"))
    b = load_file(str(killed / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    remaining = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert remaining == [f"step-{STEPS - 1:07d}", f"step-{STEPS:07d}"]
