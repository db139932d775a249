"""The training infrastructure both stages share: run setup, optimizer steps, resume and the loop.

A stage is a `Task`: its models (each trained by an `OptimizerUnit`), its data, one optimisation
step on a list of micro-batches, evaluation and image grids. Everything else (process group, run
folder, precision, accumulation with `no_sync`, clipping, non-finite steps, EMA, checkpoints and
resume, SIGTERM, logging, throughput) lives here once.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from parti import distributed
from parti.config import to_container
from parti.distributed import Dist
from parti.distributed.checkpoint import Checkpointer, rng_state, set_rng_state
from parti.training.ema import EMA
from parti.training.logging import RunLogger
from parti.training.optim import build_optimizer, build_scheduler
from parti.training.perf import RateMeter, peak_flops
from parti.training.precision import autocast_factory, make_scaler, resolve_precision


@dataclass
class Run:
    """What every part of a run needs to know: config, process, folder, precision."""

    cfg: DictConfig
    dist: Dist
    run_dir: Path
    precision: str
    autocast: Callable[[], contextlib.AbstractContextManager]

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def accumulation(self) -> int:
        t = self.cfg.trainer
        return t.global_batch // (t.micro_batch * self.dist.world_size)


def _hydra_job_dir() -> Path | None:
    """Hydra's per-job folder in a multirun sweep (None for single runs or outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.runtime.output_dir)


def _new_run_dir(out_dir: str, name: str) -> Path:
    """`<out_dir>/<name>/<date_time>`, with a suffix if a run started in the same second."""
    base = Path(out_dir) / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def resolve_run_dir(cfg: DictConfig, dist: Dist) -> Path:
    """One folder per run, chosen by rank 0 and shared with every rank; created by rank 0."""
    path = None
    if dist.is_main:
        path = Path(cfg.run_dir) if cfg.run_dir else _hydra_job_dir() or _new_run_dir(
            cfg.out_dir, cfg.name)
        path.mkdir(parents=True, exist_ok=True)
        _save_config(cfg, path)
    return Path(distributed.broadcast_object(str(path) if path else None))


def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml of the first start; a resume with other values keeps both files."""
    text = OmegaConf.to_yaml(OmegaConf.create(to_container(cfg)))
    first = run_dir / "config.yaml"
    if not first.exists():
        first.write_text(text)
    elif first.read_text() != text:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        (run_dir / f"config.{stamp}.yaml").write_text(text)


def start_run(cfg: DictConfig, validate: Callable[[DictConfig, int], None],
              inputs: Mapping[str, str] | None = None) -> Run:
    """Join the process group, check the config for this world size, seed, choose the run folder.

    `inputs` maps config keys naming files the run reads but cannot make to how to make each;
    a missing one stops every rank here, before any work.
    """
    dist = init_and_validate(cfg, validate, inputs or {})
    torch.manual_seed(cfg.trainer.seed)
    precision = resolve_precision(cfg.trainer.precision, dist.device)
    run_dir = resolve_run_dir(cfg, dist)
    return Run(cfg=cfg, dist=dist, run_dir=run_dir, precision=precision,
               autocast=autocast_factory(precision, dist.device))


def init_and_validate(cfg: DictConfig, validate: Callable[[DictConfig, int], None],
                      inputs: Mapping[str, str]) -> Dist:
    """The process group, then the value checks (the batch contract needs the world size)."""
    dist = distributed.init_distributed()
    try:
        validate(cfg, dist.world_size)
        for key, how in inputs.items():
            path = OmegaConf.select(cfg, key)
            if not Path(path).exists():
                raise FileNotFoundError(f"{key}: {path} does not exist. {how}")
    except (ValueError, FileNotFoundError):
        distributed.shutdown()
        raise
    return dist


def skipped_totals(skipped: dict[str, int], device: torch.device) -> dict[str, float]:
    """`data/skipped_<reason>` summed over ranks. Every rank runs the same collectives whatever it
    skipped (its reasons may be none, or differ from the other ranks')."""
    totals = distributed.sum_dicts({k: float(v) for k, v in skipped.items()}, device)
    return {f"data/skipped_{reason}": total for reason, total in totals.items()}


class OptimizerUnit:
    """One trained module with its optimizer, schedule and scaler: accumulate, clip, step.

    `module` is the plain model (checkpoints, EMA, evaluation); `wrapped` is what the loss calls
    (DDP and/or torch.compile around it).
    """

    def __init__(self, module: nn.Module, run: Run):
        cfg = run.cfg
        self.module = module.to(run.device)
        self.run = run
        # Buffers (e.g. codebook usage counts) are per rank; models that need them equal sync them.
        self.ddp = DDP(self.module, broadcast_buffers=False) if run.dist.enabled else None
        wrapped = self.ddp or self.module
        self.wrapped = torch.compile(wrapped) if cfg.trainer.compile else wrapped
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.steps)
        self.scaler = make_scaler(run.precision, run.device)
        self.clip = cfg.trainer.grad_clip

    def step(self, micro_batches: list, loss_fn: Callable[[nn.Module, dict, int], dict]) -> dict:
        """Accumulate `loss_fn(wrapped, batch, index)["total"]` over the micro-batches, then update.

        Gradients are synchronised only on the last micro-batch (`no_sync` on the others). A
        non-finite gradient norm skips the update (reported as `skipped`: 1.0). The schedule
        advances either way, so the lr is always a function of the step.
        """
        n = len(micro_batches)
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            sync = self.ddp is None or i == n - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.run.autocast():
                    losses = loss_fn(self.wrapped, batch, i)
                self.scaler.scale(losses["total"] / n).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / n
        self.scaler.unscale_(self.optimizer)
        max_norm = self.clip if self.clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        finite = math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        totals.update(grad_norm=grad_norm if finite else 0.0, skipped=0.0 if finite else 1.0,
                      lr=self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        return totals

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class Task(ABC):
    """The stage-specific half of training. `units["model"]` is the model that is exported."""

    units: dict[str, OptimizerUnit]

    @abstractmethod
    def train_loader(self, state: dict | None):
        """The endless training stream of this rank, positioned at `state` (None = the start)."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        """One optimisation step; returns scalars tagged `group/name` and `skipped` (0 or 1)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Held-out metrics (collective: every rank calls it), tagged `eval/...`."""

    @abstractmethod
    def log_images(self, model: nn.Module, logger: RunLogger, step: int) -> None:
        """Image grids for TensorBoard (rank 0 only)."""

    @abstractmethod
    def export_config(self) -> dict:
        """What an inference user needs to rebuild the exported model."""

    def samples_per_batch_flops(self) -> tuple[int, float]:
        """(tokens per sample, training FLOPs per sample) for throughput and MFU; 0 = unknown."""
        return 0, 0.0

    def counters(self) -> dict[str, float]:
        """Running totals logged as they are at each log step (not averaged over the window)."""
        return {}

    def extra_state(self) -> dict:
        """Task state beyond the units' (checkpointed)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned (a task without extra state expects none)."""
        if state:
            raise ValueError(f"checkpoint holds task state {sorted(state)} this task does not use")


class StopRequested:
    """Turns SIGTERM/SIGUSR1 into a flag the loop checks between steps.

    Under torch.distributed each check starts a non-blocking sum of every rank's flag and reads
    the sum started at the previous check, which has had a whole step to finish: no rank waits on
    the others every step, and every rank stops at the same step, one step after the signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.flag = False
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled (so all save and stop together)."""
        if not dist.is_initialized():
            return self.flag
        value = torch.tensor([1.0 if self.flag else 0.0], device=device)
        previous, self._pending = self._pending, (dist.all_reduce(value, async_op=True), value)
        if previous is None:
            return False
        work, total = previous
        work.wait()
        return bool(total.item() > 0)

    def restore(self) -> None:
        """Finish the outstanding sum (every rank launched it) and restore the signal handlers."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Resume, then loop: micro-batches -> task step -> EMA, logs, evaluation, checkpoints."""

    def __init__(self, run: Run, task: Task):
        self.run, self.task, self.cfg = run, task, run.cfg
        self.step = 0
        self.checkpointer = Checkpointer(run.run_dir, self.cfg.trainer.keep_last, run.dist)
        decay = self.cfg.trainer.ema_decay
        self.ema = EMA(task.units["model"].module, decay) if decay > 0 else None
        self.loader_state: dict | None = None
        self.bad_streak = 0
        self.bad_total = 0

    # ---------------------------------------------------------------- resume
    def resume(self) -> Path | None:
        """Restore the newest complete checkpoint (resume=auto), a given one, or start fresh."""
        mode = self.cfg.resume
        if mode == "never":
            if self.checkpointer.complete():
                raise RuntimeError(
                    f"{self.run.run_dir} already holds checkpoints and resume=never: use "
                    "resume=auto to continue it, or another run_dir; nothing was overwritten")
            return None
        path = self.checkpointer.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        shared, own = self.checkpointer.load(path)
        self._check_stage(path, shared)
        for name, unit in self.task.units.items():
            unit.load_state_dict(shared["units"][name])
        if self.ema is not None:
            if "ema" in shared:
                self.ema.load_state_dict(shared["ema"])
            else:  # EMA switched on at this resume: it starts from the resumed weights
                self.ema = EMA(self.task.units["model"].module, self.cfg.trainer.ema_decay)
        self.task.load_extra_state(shared["task"])
        self.step = shared["step"]
        self.bad_total = shared["bad_steps"]
        set_rng_state(own["rng"])
        self.loader_state = own["data"]
        return path

    def _check_stage(self, path: Path, shared: dict) -> None:
        """Refuse a checkpoint written by the other stage, naming both kinds."""
        kind = self.task.export_config()["kind"]
        saved = shared.get("export_config", {}).get("kind", "unknown")
        if saved != kind or set(shared["units"]) != set(self.task.units):
            raise ValueError(
                f"{path} is a checkpoint of a {saved} model, but this run trains a {kind} model: "
                "resume= takes a checkpoint folder (<run_dir>/checkpoints/step-N) written by the "
                "same stage (train_vqgan.py: vitvqgan, train_parti.py: parti)")

    def save(self, loader) -> Path:
        shared = {"step": self.step, "config": to_container(self.cfg), "bad_steps": self.bad_total,
                  "units": {name: unit.state_dict() for name, unit in self.task.units.items()},
                  "task": self.task.extra_state(), "export_config": self.task.export_config()}
        if self.ema is not None:
            shared["ema"] = self.ema.state_dict()
        own = {"rng": rng_state(), "data": loader.state_dict()}
        return self.checkpointer.save(self.step, shared, own)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA weights when kept, else the trained ones."""
        return self.ema.model if self.ema is not None else self.task.units["model"].module

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        """Train to trainer.steps; returns the final evaluation metrics."""
        t, run = self.cfg.trainer, self.run
        logger = RunLogger(run.run_dir, run.dist.is_main, t.steps, self.step, t.progress)
        resumed_from = self.step
        logger.info(f"run folder {run.run_dir} | model {self.cfg.model.name} | data "
                    f"{self.cfg.data.name} | world size {run.dist.world_size} | precision "
                    f"{run.precision} | accumulation {run.accumulation} | start step {self.step}")
        if self.step == 0:
            # Models were built from the same seed on every rank; from here on each rank draws its
            # own dropout masks and text dropout (a resumed run restores these RNG states instead).
            torch.manual_seed(t.seed + run.dist.rank)
            logger.text("config", f"```\n{OmegaConf.to_yaml(self.cfg, resolve=True)}\n```", 0)
        loader = self.task.train_loader(self.loader_state)
        batches = iter(loader)
        tokens_per_sample, flops_per_sample = self.task.samples_per_batch_flops()
        peak = peak_flops(run.device, t.peak_flops) if flops_per_sample else 0.0
        stop = StopRequested()
        meter = RateMeter()
        window: dict[str, list[float]] = {}
        try:
            while self.step < t.steps:
                micro_batches = [next(batches) for _ in range(run.accumulation)]
                scalars = self.task.train_step(micro_batches, self.step)
                self.step += 1
                self._count_bad(scalars.pop("skipped"))
                if self.ema is not None:
                    self.ema.update(self.task.units["model"].module)
                meter.add(t.global_batch)
                for key, value in scalars.items():
                    total = window.setdefault(key, [0.0, 0])
                    total[0] += value
                    total[1] += 1
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log(logger, loader, window, meter, tokens_per_sample, flops_per_sample,
                              peak)
                    window = {}
                before_end = self.step < t.steps  # the end of the run evaluates and draws anyway
                if t.eval_every and self.step % t.eval_every == 0 and before_end:
                    self._evaluate(logger)
                if t.image_every and self.step % t.image_every == 0 and before_end and (
                        run.dist.is_main):
                    self.task.log_images(self.eval_model, logger, self.step)
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save(loader)
                if stop.agreed(run.device):
                    path = self.save(loader)
                    logger.info(f"stop requested: saved {path} at step {self.step}; exiting")
                    return {}
            path = self.save(loader)
            logger.info(f"saved {path} ({self.step - resumed_from} steps this session)")
            final = self._evaluate(logger)
            if run.dist.is_main:
                self.task.log_images(self.eval_model, logger, self.step)
                record = {"step": self.step, **final}
                (run.run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
                logger.hparams(to_container(self.cfg), final)
            return final
        finally:
            stop.restore()
            logger.close()

    def _count_bad(self, skipped: float) -> None:
        """Count non-finite steps; too many in a row stop the run (the last checkpoint is intact)."""
        if skipped:
            self.bad_streak += 1
            self.bad_total += 1
            if self.bad_streak >= self.cfg.trainer.max_bad_steps:
                last = self.checkpointer.latest()
                raise RuntimeError(
                    f"{self.bad_streak} consecutive steps with a non-finite loss or gradient norm "
                    f"(step {self.step}); the last good checkpoint is {last}. Lower lr, check the "
                    "data, or use trainer.precision=fp32")
        else:
            self.bad_streak = 0

    def _log(self, logger, loader, window, meter, tokens_per_sample, flops_per_sample, peak):
        rate, step_time = meter.read()
        scalars = {key: total / count for key, (total, count) in window.items()}
        scalars = distributed.reduce_scalars(scalars, self.run.device)
        scalars.update(skipped_totals(loader.skipped, self.run.device))
        scalars["train/nonfinite_steps"] = float(self.bad_total)
        scalars.update(self.task.counters())
        scalars["perf/samples_per_s"] = rate
        scalars["perf/step_time_s"] = step_time
        if tokens_per_sample:
            scalars["perf/tokens_per_s"] = rate * tokens_per_sample
        if flops_per_sample and peak:
            scalars["perf/mfu"] = rate * flops_per_sample / (peak * self.run.dist.world_size)
        logger.scalars(scalars, self.step)
        shown = {k.split("/")[-1]: v for k, v in scalars.items()
                 if k in ("train/loss", "train/total", "perf/samples_per_s")}
        logger.progress(self.step, shown)
        logger.info(f"step {self.step} " + " ".join(
            f"{k}={v:.4g}" for k, v in sorted(scalars.items())))

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        metrics = self.task.evaluate(self.eval_model, self.step)
        logger.scalars(metrics, self.step)
        logger.info(f"eval step {self.step}: " + " ".join(
            f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics
