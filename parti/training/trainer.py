"""The training infrastructure both stages share: run setup, optimizer steps, resume and the loop.

A stage is a `Task`: its models (each trained by an `OptimizerUnit`), its data, one optimisation
step on a list of micro-batches, evaluation and image grids. Everything else (process group, run
folder, precision, accumulation with `no_sync`, clipping, non-finite steps, EMA, checkpoints and
resume, SIGTERM, logging, throughput) lives here once.
"""

from __future__ import annotations

import contextlib
import copy
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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parti import distributed
from parti.config import to_container
from parti.data.pipeline import DataStateMismatch
from parti.distributed import Dist
from parti.distributed.checkpoint import (
    Checkpointer,
    export_weights,
    read_shared,
    rng_state,
    set_rng_state,
)
from parti.distributed.parallel import full_tensor, full_tensors, gather_to_cpu, parallelize
from parti.models.layers import TransformerBlock
from parti.training.ema import EMA
from parti.training.logging import RunLogger, log
from parti.training.optim import build_optimizer, build_scheduler
from parti.training.perf import RateMeter, peak_flops
from parti.training.precision import (
    autocast_factory,
    fast_fp32_math,
    make_scaler,
    resolve_precision,
)


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
    fast_fp32_math(dist.device)
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

    `module` is the model itself (sharded in place under FSDP): state dicts, EMA. `wrapped` is what
    the loss calls (the DDP wrapper, or the module). Transformer blocks are the units of FSDP
    sharding, activation checkpointing and torch.compile.
    """

    def __init__(self, module: nn.Module, run: Run):
        cfg = run.cfg
        t = cfg.trainer
        self.run = run
        # The plain architecture, weightless: evaluation copies (EMA, FSDP) are built from it.
        self._skeleton = copy.deepcopy(module).to("meta")
        self._replica: nn.Module | None = None
        self.parallel = parallelize(module.to(run.device), t.strategy, run.dist, run.precision,
                                    t.activation_checkpointing, t.compile, (TransformerBlock,))
        self.module = self.parallel.module
        self.wrapped = self.parallel.wrapped
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.steps)
        self.scaler = make_scaler(run.precision, run.device)
        self.clip = t.grad_clip
        # Fused Adam/AdamW skip a non-finite step inside their kernel: no host read per step.
        fused = bool(self.optimizer.defaults.get("fused"))
        self.skips_on_device = fused and not self.scaler.is_enabled()

    def step(self, micro_batches: list, loss_fn: Callable[[nn.Module, dict, int], dict]) -> dict:
        """Accumulate `loss_fn(wrapped, batch, index)["total"]` over the micro-batches, then update.

        Gradients are reduced over ranks only on the last micro-batch. A non-finite gradient norm
        skips the update (`skipped`: 1). Everything stays on the device (the loop reads it once
        per log interval): fused Adam/AdamW skip through their `found_inf` input; only the other
        optimizers and fp16 loss scaling read the norm's finiteness on the host. The schedule
        advances either way, so the lr is always a function of the step.
        """
        n = len(micro_batches)
        totals: dict[str, torch.Tensor | float] = {}
        for i, batch in enumerate(micro_batches):
            with self.parallel.gradient_sync(i == n - 1):
                with self.run.autocast():
                    losses = loss_fn(self.wrapped, batch, i)
                self.scaler.scale(losses["total"] / n).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / n
        self.scaler.unscale_(self.optimizer)
        max_norm = self.clip if self.clip > 0 else math.inf
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        finite = torch.isfinite(norm)  # the norm over every shard of every rank
        skipped = (~finite).float()
        if self.skips_on_device:
            self.optimizer.found_inf = skipped
            self.optimizer.step()
        elif bool(finite):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        totals.update(grad_norm=torch.where(finite, norm, 0.0), skipped=skipped,
                      lr=self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        return totals

    def tensor_state(self) -> dict:
        """Weights and optimizer moments, keyed by parameter name, sharded as held (DCP)."""
        return {"model": get_model_state_dict(self.module),
                "optimizer": get_optimizer_state_dict(self.module, self.optimizer)["state"]}

    def shared_state(self) -> dict:
        """The rest, equal on every rank: schedule, scaler, optimizer hyperparameters."""
        groups = get_optimizer_state_dict(self.module, self.optimizer)["param_groups"]
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "param_groups": groups}

    def load_state(self, tensors: dict, shared: dict) -> dict[str, tuple]:
        """Restore from `tensor_state()` (filled from a checkpoint) and `shared_state()`.

        The optimizer's moments and the schedule's position come from the checkpoint, its
        hyperparameters (lr, betas, eps, weight decay, ...) from this run's config, as the
        schedule's shape already does: resuming with a lower lr lowers it. Returns the settings
        that changed, {key: (checkpoint's, config's)}."""
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr")}
                      for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        set_model_state_dict(self.module, tensors["model"])
        set_optimizer_state_dict(self.module, self.optimizer, {
            "state": tensors["optimizer"], "param_groups": shared["param_groups"]})
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        changed = {}
        for group, settings in zip(self.optimizer.param_groups, configured):
            for key, value in settings.items():
                if group.get(key) != value:
                    if key != "initial_lr":  # the schedule's base lr, reported as lr below
                        changed[key] = (group.get(key), value)
                    group[key] = value
        if self.scheduler.base_lrs != base_lrs:
            changed["lr"] = (self.scheduler.base_lrs[0], base_lrs[0])
        self.scheduler.base_lrs = base_lrs
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)  # what LambdaLR computes at this step
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return changed

    def replica(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain (unsharded) copy of the module holding `state`, a possibly sharded state dict
        (gathering it is collective under FSDP). Under FSDP the copy is built for this call only,
        in bf16 when training in bf16 (evaluation runs under autocast anyway): 2 bytes/param."""
        replica = self._replica
        if replica is None:
            replica = copy.deepcopy(self._skeleton).to_empty(device=self.run.device)
            unsaved = {name for name, _ in replica.named_buffers()} - set(replica.state_dict())
            if unsaved:  # to_empty leaves them uninitialised and no state dict fills them
                raise TypeError(f"non-persistent buffers {sorted(unsaved)} cannot be copied")
            replica.eval().requires_grad_(False)
            if self.parallel.sharded and self.run.precision == "bf16":
                replica.to(torch.bfloat16)
            if not self.parallel.sharded:
                self._replica = replica  # kept: it costs only memory, as a full copy exists anyway
        own = replica.state_dict()
        with torch.no_grad():
            for name, tensor in full_tensors(state):
                own[name].copy_(tensor)
        return replica


class Task(ABC):
    """The stage-specific half of training. `units["model"]` is the model that is exported."""

    units: dict[str, OptimizerUnit]

    @abstractmethod
    def train_loader(self, state: dict | None):
        """The endless training stream of this rank, positioned at `state` (None = the start)."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float | torch.Tensor]:
        """One optimisation step; returns scalars tagged `group/name` (floats or 0-dim device
        tensors, read only when logged) and `skipped` (0 or 1)."""

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
    the others every step, and every rank stops at the same step, one step after the signal. The
    flag is a CPU tensor (summed by gloo, also beside NCCL), so reading it never waits on the GPU.
    After the loop has saved, `hand_over` passes the signal on to the handler installed before
    (under submitit: requeue the job, so a preempted SLURM run continues from that checkpoint).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.flag = False
        self.received: int | None = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag = True
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (so all save and stop together)."""
        if not dist.is_initialized():
            return self.flag
        value = torch.tensor([1.0 if self.flag else 0.0])
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

    def hand_over(self) -> None:
        """Run the previous handler of the signal this rank received (if it had one of its own)."""
        handler = self._previous.get(self.received) if self.received is not None else None
        self.restore()
        if callable(handler):
            handler(self.received, None)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of `rank`'s dropout masks and text dropout from `step` on: seed + rank at step 0
    (every rank its own), and a different one for each step a run resumes at with another world
    size (whose per-rank RNG states cannot be restored)."""
    return seed + rank + step * 1_000_003


class Trainer:
    """Resume, then loop: micro-batches -> task step -> EMA, logs, evaluation, checkpoints."""

    def __init__(self, run: Run, task: Task):
        self.run, self.task, self.cfg = run, task, run.cfg
        self.step = 0
        self.checkpointer = Checkpointer(run.run_dir, self.cfg.trainer.keep_last, run.dist)
        decay = self.cfg.trainer.ema_decay
        self.ema = EMA(task.units["model"].module, decay) if decay > 0 else None
        self.loader_state: dict | None = None
        # Non-finite steps, counted on the device and checked when logging or saving: in total,
        # in a row up to the last step, and the longest run in a row so far.
        zero = torch.zeros((), device=run.device)
        self.bad_total, self.bad_streak, self.worst_streak = zero, zero, zero

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
        shared = read_shared(path)
        self._check_stage(path, shared)
        tensors = self._tensor_state(with_ema=shared["has_ema"] and self.ema is not None)
        own = self.checkpointer.load(path, tensors)
        for name, unit in self.task.units.items():
            changed = unit.load_state(tensors["units"][name], shared["units"][name])
            if changed and self.run.dist.is_main:
                log.warning(f"{name} optimizer: from the config, not the checkpoint: " + ", ".join(
                    f"{key} {old} -> {new}" for key, (old, new) in sorted(changed.items())))
        if self.ema is not None:
            if shared["has_ema"]:
                self.ema.load_state_dict(tensors["ema"])
            else:  # EMA switched on at this resume: it starts from the resumed weights
                self.ema = EMA(self.task.units["model"].module, self.cfg.trainer.ema_decay)
        self.task.load_extra_state(shared["task"])
        self.step = shared["step"]
        if mode != "auto":  # a named checkpoint older than this run's newest rolls the run back
            self.checkpointer.set_aside_after(self.step)
        self.bad_total = torch.tensor(float(shared["bad_steps"]), device=self.run.device)
        if own is not None:
            set_rng_state(own["rng"])
            self.loader_state = own["data"]
        else:  # another world size: each rank draws afresh, but not what another rank draws
            torch.manual_seed(rank_seed(self.cfg.trainer.seed, self.run.dist.rank, self.step))
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

    def _tensor_state(self, with_ema: bool) -> dict:
        """Everything held as (possibly sharded) tensors: weights, optimizer moments, EMA."""
        tensors = {"units": {name: unit.tensor_state() for name, unit in self.task.units.items()}}
        if with_ema:
            tensors["ema"] = self.ema.state_dict()
        return tensors

    def save(self, loader) -> Path:
        self._check_bad_streak()
        shared = {"step": self.step, "config": to_container(self.cfg),
                  "bad_steps": int(self.bad_total),
                  "units": {name: unit.shared_state() for name, unit in self.task.units.items()},
                  "task": self.task.extra_state(), "export_config": self.task.export_config(),
                  "has_ema": self.ema is not None}
        own = {"rng": rng_state(), "data": loader.state_dict()}
        return self.checkpointer.save(self.step, shared, own,
                                      self._tensor_state(with_ema=self.ema is not None))

    def eval_model(self) -> nn.Module:
        """The weights evaluation, image grids and export use: the EMA when kept, else the trained
        ones, as a plain module. Collective under FSDP (the whole model is gathered on every rank):
        call it on every rank."""
        unit = self.task.units["model"]
        if self.ema is None and not unit.parallel.sharded:
            return unit.module
        return unit.replica(self.ema.state_dict() if self.ema else unit.module.state_dict())

    def export(self, out_dir: Path) -> None:
        """Write the inference weights (one safetensors file of the whole model, fp32, the EMA
        when kept); collective."""
        unit = self.task.units["model"]
        state = self.ema.state_dict() if self.ema is not None else unit.module.state_dict()
        weights = gather_to_cpu(state, keep=self.run.dist.is_main)
        if self.run.dist.is_main:
            export_weights(out_dir, weights, self.task.export_config())
        distributed.barrier()

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
            torch.manual_seed(rank_seed(t.seed, run.dist.rank, 0))
            logger.text("config", f"```\n{OmegaConf.to_yaml(self.cfg, resolve=True)}\n```", 0)
        try:
            loader = self.task.train_loader(self.loader_state)
        except DataStateMismatch as exn:  # the same on every rank: the settings are the run's
            logger.info(f"warning: {exn}: the data stream starts afresh; weights, optimizer, "
                        "schedule and step are restored")
            loader = self.task.train_loader(None)
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
                if t.image_every and self.step % t.image_every == 0 and before_end:
                    self._log_images(logger)
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save(loader)
                if stop.agreed():
                    path = self.save(loader)
                    logger.info(f"stop requested: saved {path} at step {self.step}; exiting")
                    stop.hand_over()
                    return {}
            path = self.save(loader)
            logger.info(f"saved {path} ({self.step - resumed_from} steps this session)")
            final = self._evaluate(logger)
            if t.image_every:
                self._log_images(logger)
            if run.dist.is_main:
                record = {"step": self.step, **final}
                (run.run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
                logger.hparams(to_container(self.cfg), final)
            return final
        finally:
            stop.restore()
            logger.close()

    def _count_bad(self, skipped: torch.Tensor | float) -> None:
        """Add this step's `skipped` (0 or 1) to the device-side counts (no host read)."""
        self.bad_total = self.bad_total + skipped
        self.bad_streak = (self.bad_streak + skipped) * skipped
        self.worst_streak = torch.maximum(self.worst_streak, self.bad_streak)

    def _check_bad_streak(self) -> None:
        """Stop the run once max_bad_steps non-finite steps came in a row (skipped steps change no
        weights, so the last checkpoint and the model are intact)."""
        worst = int(self.worst_streak)
        if worst >= self.cfg.trainer.max_bad_steps:
            raise RuntimeError(
                f"{worst} consecutive steps with a non-finite loss or gradient norm (seen at step "
                f"{self.step}); the last good checkpoint is {self.checkpointer.latest()}. Lower "
                "lr, check the data, or use trainer.precision=fp32")

    def _log(self, logger, loader, window, meter, tokens_per_sample, flops_per_sample, peak):
        self._check_bad_streak()
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

    def _log_images(self, logger: RunLogger) -> None:
        model = self.eval_model()  # on every rank: gathering it may be collective
        if self.run.dist.is_main:
            self.task.log_images(model, logger, self.step)

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        metrics = self.task.evaluate(self.eval_model(), self.step)
        logger.scalars(metrics, self.step)
        logger.info(f"eval step {self.step}: " + " ".join(
            f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics
