"""Beyond one node: torchrun's c10d rendezvous across two local "nodes", SLURM's rank layout and
launcher config, and preemption that saves before handing the signal to submitit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from parti.config import register_configs, validate_vqgan
from parti.distributed import first_host, slurm_layout
from parti.training.stage1 import VQGANTask
from parti.training.trainer import Trainer, start_run
from tests.conftest import CONF_DIR, compose_config, tiny_vqgan_overrides
from tests.test_launch import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def start_all(commands: list[list[str]], envs: list[dict]) -> None:
    """Start every process (this environment without any rank layout, plus its own), then wait
    for all; each must succeed."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    procs = [subprocess.Popen(c, cwd=ROOT, env={**base, "OMP_NUM_THREADS": "1", **e},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in zip(commands, envs)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]


def stage1_overrides(shapes_dir: Path, out_dir: Path) -> list[str]:
    """Tiny stage 1 in a folder the run chooses under `out_dir` (so 'one folder' is tested)."""
    return [o for o in tiny_vqgan_overrides(shapes_dir, out_dir, steps=2)
            if not o.startswith(("run_dir=", "trainer.micro_batch=", "trainer.global_batch="))] + [
        f"out_dir={out_dir}", "trainer.micro_batch=4", "trainer.global_batch=8"]


def assert_one_run_of_two_ranks(out_dir: Path) -> None:
    runs = [p for p in (out_dir / "vqgan").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    assert "world size 2" in (runs[0] / "train.log").read_text()
    assert (runs[0] / "checkpoints" / "step-0000002" / "COMPLETE").is_file()
    assert (runs[0] / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_local_nodes_train_together_through_c10d(shapes_dir, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                 str(node), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                 endpoint, "--rdzv_id", "parti-test", "train_vqgan.py",
                 *stage1_overrides(shapes_dir, tmp_path)] for node in (0, 1)]
    start_all(commands, [{}, {}])
    assert_one_run_of_two_ranks(tmp_path)


@pytest.mark.slow
def test_slurm_tasks_without_torchrun_train_together(shapes_dir, tmp_path):
    """Two processes given only SLURM's variables (as srun starts them) form one world."""
    command = [sys.executable, "train_vqgan.py", *stage1_overrides(shapes_dir, tmp_path)]
    port = str(free_port())
    envs = [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
             "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "4242", "MASTER_PORT": port}
            for r in range(2)]
    start_all([command, command], envs)
    assert_one_run_of_two_ranks(tmp_path)


def test_rank_layout_from_a_faked_slurm_environment():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "777",
           "SLURM_JOB_NODELIST": "gpu[007-008],cpu1"}
    assert slurm_layout(env) == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
                                 "MASTER_ADDR": "gpu007", "MASTER_PORT": "20777"}
    assert slurm_layout({**env, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert slurm_layout({**env, "RANK": "0"}) == {}  # torchrun's own variables win
    assert slurm_layout({}) == {}
    assert first_host("node1") == "node1"
    assert first_host("a[1,3],b[2-4]") == "a1"
    assert first_host("rack[2-3]-n[05-06]") == "rack2-n05"


def test_slurm_launcher_config_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_parti", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=4",
                                                "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert launcher.partition == "gpu" and launcher.signal_delay_s == 120
    assert launcher.max_num_timeout > 0  # preempted jobs are requeued


def test_preemption_saves_then_hands_the_signal_to_the_previous_handler(shapes_dir, tmp_path):
    """submitit installs a SIGUSR1 handler that requeues the job; it must run after the save."""
    run = start_run(compose_config("train_vqgan", tiny_vqgan_overrides(
        shapes_dir, tmp_path, steps=50)), validate_vqgan)
    task = VQGANTask(run)
    step = task.train_step

    def step_then_signal(micro_batches, index):
        out = step(micro_batches, index)
        if index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    task.train_step = step_then_signal
    handed: list[tuple[int, list[str]]] = []

    def requeue(signum, frame):
        handed.append((signum, sorted(p.name for p in (tmp_path / "checkpoints").iterdir())))

    previous = signal.signal(signal.SIGUSR1, requeue)
    try:
        assert Trainer(run, task).fit() == {}
        assert signal.getsignal(signal.SIGUSR1) is requeue  # the trainer's handler is gone
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handed == [(signal.SIGUSR1, ["step-0000002"])]
