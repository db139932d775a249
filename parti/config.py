"""Config schemas (dataclasses registered in Hydra's ConfigStore) and the value checks run at start.

Hydra and OmegaConf reject unknown keys and wrong types while composing; `validate_*` below rejects
impossible values with a message that names the key, before any work is done.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from parti.config_errors import check_config
from parti.distributed.checkpoint import MARKER
from parti.distributed.parallel import STRATEGIES
from parti.losses import vqgan as vqgan_loss
from parti.losses.vqgan import VQGANLossConfig
from parti.models import parti as parti_model
from parti.models import vitvqgan
from parti.models.parti import PartiConfig
from parti.models.vitvqgan import VitVQGANConfig
from parti.sampling import SamplingConfig, validate_sampling

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "parti")
RESUME_MODES = ("auto", "never")


@dataclass
class DataConfig:
    """Where the shards are and how they are read (one file per dataset in conf/data/)."""

    name: str = MISSING
    train_shards: str = ""                # image shards: brace pattern, list joined by '::', or pipe:
    eval_shards: str = ""                 # finite held-out image shards (both: stage 1, or on the fly)
    token_train_shards: str = ""          # stage 2: shards of precomputed image tokens ('' = none)
    token_eval_shards: str = ""
    text_tokenizer: str = ""              # stage 2: SentencePiece model trained on the captions
    encode_on_the_fly: bool = False       # stage 2: encode image shards with the frozen tokenizer
    image_size: int = 64                  # images are resized and cropped to this square size
    num_workers: int = 2                  # DataLoader workers per rank
    shards_per_block: int = 4             # shards interleaved per resampling block (see pipeline)
    shuffle_buffer: int = 1000            # raw samples in the shuffle buffer
    eval_samples: int = 256               # held-out samples used by each evaluation
    generate: bool = False                # write the shapes data set where the shards point, on first use


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule; `lr` comes from the top-level key."""

    name: str = "adamw"
    lr: float = MISSING                   # set to ${lr} in conf/optim/*.yaml
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0             # matrices and embeddings only; AdamW, Adafactor: decoupled,
                                          # Adam, SGD: L2 added to the gradient
    schedule: str = "cosine"              # constant | cosine | parti
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1           # lr at the end (step trainer.steps) / peak lr (cosine, parti)
    decay_start: int = 0                  # parti schedule: exponential decay starts here


@dataclass
class TrainerConfig:
    """The loop: steps, batch contract, precision, clipping, intervals, checkpoints."""

    steps: int = 1000
    global_batch: int = 32                # = micro_batch x accumulation x world size
    micro_batch: int = 32
    precision: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    grad_clip: float = 1.0                # max global grad norm (0 = off)
    ema_decay: float = 0.0                # EMA of the weights (0 = off)
    compile: bool = False                 # torch.compile each Transformer block (or a block-less model)
    strategy: str = "ddp"                 # ddp (a full replica per rank) | fsdp (sharded, stage 2)
    activation_checkpointing: bool = False  # recompute each Transformer block's activations in backward
    log_every: int = 10
    eval_every: int = 500                 # evaluation on the held-out set (0 = only at the end)
    image_every: int = 500                # image grids to TensorBoard (0 = off)
    ckpt_every: int = 500                 # checkpoint interval in steps (0 = only at the end)
    keep_last: int = 3                    # complete checkpoints kept
    max_bad_steps: int = 20               # consecutive non-finite steps before the run stops
    peak_flops: float = 0.0               # per-device peak FLOP/s for MFU (0 = known GPU or measured CPU)
    progress: bool = True                 # console progress bar on rank 0
    seed: int = 0


@dataclass
class TokenizerRef:
    """The frozen stage-1 tokenizer used by stage 2: a checkpoint or export folder."""

    ckpt: str = ""


@dataclass
class SampleDuringTraining:
    """Prompts rendered into a TensorBoard grid during stage-2 training."""

    prompts: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0


@dataclass
class GenerationEval:
    """Samples for held-out captions scored by the shapes judge at each stage-2 evaluation."""

    n: int = 64                           # held-out captions sampled per evaluation (0 = off)
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])
    candidates: int = 1                   # >1: also the reranked rows (best of K by the model's score)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class VQGANTrainConfig:
    """train_vqgan.py: stage 1."""

    lr: float = 1e-4
    name: str = "vqgan"
    out_dir: str = "outputs"
    run_dir: str = ""                     # '' = a new folder under out_dir (multirun: Hydra's job folder)
    resume: str = "auto"                  # auto (newest complete checkpoint in run_dir) | never | a path
    model: VitVQGANConfig = field(default_factory=VitVQGANConfig)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class PartiTrainConfig:
    """train_parti.py: stage 2."""

    lr: float = 4.5e-4
    name: str = "parti"
    out_dir: str = "outputs"
    run_dir: str = ""
    resume: str = "auto"
    model: PartiConfig = field(default_factory=PartiConfig)
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    sample: SampleDuringTraining = field(default_factory=SampleDuringTraining)
    eval: GenerationEval = field(default_factory=GenerationEval)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    """Make the schemas available to the primary configs' defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="train_vqgan_schema", node=VQGANTrainConfig)
    cs.store(name="train_parti_schema", node=PartiTrainConfig)


def validate_optim(cfg: OptimConfig | Any) -> None:
    """Optimizer and schedule values."""
    check_config(cfg.name in OPTIMIZERS, "optim.name", f"{cfg.name!r} is not one of {OPTIMIZERS}")
    check_config(cfg.lr > 0, "lr", f"{cfg.lr} must be > 0")
    check_config(len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "optim.betas",
                 f"{list(cfg.betas)} must be two values in [0, 1)")
    check_config(cfg.weight_decay >= 0, "optim.weight_decay", f"{cfg.weight_decay} must be >= 0")
    check_config(cfg.schedule in SCHEDULES, "optim.schedule", f"{cfg.schedule!r} is not one of {SCHEDULES}")
    check_config(cfg.warmup_steps >= 0, "optim.warmup_steps", f"{cfg.warmup_steps} must be >= 0")
    check_config(0 < cfg.final_lr_ratio <= 1, "optim.final_lr_ratio", f"{cfg.final_lr_ratio} must be in (0, 1]")
    check_config(cfg.decay_start >= 0, "optim.decay_start", f"{cfg.decay_start} must be >= 0")


def validate_trainer(cfg: TrainerConfig | Any, world_size: int = 1) -> None:
    """Loop values, including the global batch contract for this world size."""
    check_config(cfg.steps > 0, "trainer.steps", f"{cfg.steps} must be > 0")
    check_config(cfg.micro_batch > 0, "trainer.micro_batch", f"{cfg.micro_batch} must be > 0")
    per_step = cfg.micro_batch * world_size
    check_config(cfg.global_batch > 0 and cfg.global_batch % per_step == 0, "trainer.global_batch",
                 f"global_batch {cfg.global_batch} is not a multiple of micro_batch {cfg.micro_batch} "
                 f"x world_size {world_size}")
    check_config(cfg.precision in PRECISIONS, "trainer.precision",
                 f"{cfg.precision!r} is not one of {PRECISIONS}")
    check_config(cfg.strategy in STRATEGIES, "trainer.strategy",
                 f"{cfg.strategy!r} is not one of {STRATEGIES}")
    check_config(cfg.strategy != "fsdp" or cfg.precision != "fp16", "trainer.precision",
                 "fp16 needs a loss scaler over sharded gradients; with trainer.strategy=fsdp use "
                 "bf16 (the CUDA default) or fp32")
    check_config(cfg.grad_clip >= 0, "trainer.grad_clip", f"{cfg.grad_clip} must be >= 0")
    check_config(0 <= cfg.ema_decay < 1, "trainer.ema_decay", f"{cfg.ema_decay} must be in [0, 1)")
    for key in ("log_every",):
        check_config(getattr(cfg, key) > 0, f"trainer.{key}", f"{getattr(cfg, key)} must be > 0")
    for key in ("eval_every", "image_every", "ckpt_every", "peak_flops"):
        check_config(getattr(cfg, key) >= 0, f"trainer.{key}", f"{getattr(cfg, key)} must be >= 0")
    check_config(cfg.keep_last >= 1, "trainer.keep_last", f"{cfg.keep_last} must be >= 1")
    check_config(cfg.max_bad_steps >= 1, "trainer.max_bad_steps", f"{cfg.max_bad_steps} must be >= 1")


def validate_data(cfg: DataConfig | Any, stage: int) -> None:
    """Data values; stage 2 also needs a text tokenizer and token shards (or on-the-fly encoding)."""
    check_config(cfg.image_size >= 8, "data.image_size", f"{cfg.image_size} must be >= 8")
    check_config(cfg.num_workers >= 0, "data.num_workers", f"{cfg.num_workers} must be >= 0")
    check_config(cfg.shards_per_block >= 1, "data.shards_per_block", f"{cfg.shards_per_block} must be >= 1")
    check_config(cfg.shuffle_buffer >= 1, "data.shuffle_buffer", f"{cfg.shuffle_buffer} must be >= 1")
    check_config(cfg.eval_samples >= 1, "data.eval_samples", f"{cfg.eval_samples} must be >= 1")
    check_config(not cfg.generate or (bool(cfg.train_shards)
                                      and not urlparse(cfg.train_shards).scheme), "data.generate",
                 f"writes the shapes data set next to data.train_shards, which must be a local path, "
                 f"not {cfg.train_shards!r}; set data.generate=false for other shards")
    images = "stage 1 trains on" if stage == 1 else "data.encode_on_the_fly=true encodes"
    for key in ("train_shards", "eval_shards"):
        check_config(bool(getattr(cfg, key)) or (stage == 2 and not cfg.encode_on_the_fly),
                     f"data.{key}", f"is empty: {images} image shards; set it")
    if stage == 2:
        check_config(bool(cfg.text_tokenizer), "data.text_tokenizer",
                     "stage 2 needs a SentencePiece model: python -m parti.text.train --shards ... --out ...")
        for key in ("token_train_shards", "token_eval_shards"):
            check_config(cfg.encode_on_the_fly or bool(getattr(cfg, key)), f"data.{key}",
                         "is empty: make token shards with python -m parti.data.tokenize, or set "
                         "data.encode_on_the_fly=true")


def _check_resume(resume: str) -> None:
    """auto, never, or a complete checkpoint folder, checked before any model is built."""
    check_config(bool(resume), "resume", f"must be one of {RESUME_MODES} or a checkpoint path")
    if resume in RESUME_MODES:
        return
    path = Path(resume)
    hint = (f"; to continue the run in {path}, pass run_dir={path} resume=auto"
            if (path / "checkpoints").is_dir() else "")
    check_config((path / MARKER).is_file(), "resume",
                 f"{resume!r} is neither {' nor '.join(RESUME_MODES)} nor a complete checkpoint "
                 f"folder (<run_dir>/checkpoints/step-N holding {MARKER}){hint}")


def warn_schedule(optim: OptimConfig | DictConfig, steps: int) -> None:
    """Warn when the schedule's phases do not fit into the run: legal (a run may be continued
    with more steps), but most often a preset meant for a longer run."""
    if optim.warmup_steps >= steps:
        warnings.warn(f"optim.warmup_steps={optim.warmup_steps} >= trainer.steps={steps}: the "
                      "whole run is warm-up (the lr never reaches its peak)", stacklevel=2)
    elif optim.schedule == "parti" and optim.decay_start >= steps:
        warnings.warn(f"optim.decay_start={optim.decay_start} >= trainer.steps={steps}: the "
                      "parti schedule never decays in this run", stacklevel=2)


def validate_vqgan(cfg: VQGANTrainConfig | DictConfig, world_size: int = 1) -> None:
    """Every check for a stage-1 run."""
    vitvqgan.validate(cfg.model)
    vqgan_loss.validate(cfg.loss)
    validate_data(cfg.data, stage=1)
    validate_optim(cfg.optim)
    validate_trainer(cfg.trainer, world_size)
    warn_schedule(cfg.optim, cfg.trainer.steps)
    check_config(cfg.trainer.strategy == "ddp", "trainer.strategy",
                 "stage 1 trains with ddp: the largest ViT-VQGAN fits on one GPU, and dead-code "
                 "restarts write whole codebook rows, which FSDP shards (fsdp is for stage 2)")
    check_config(cfg.data.image_size == cfg.model.image_size, "data.image_size",
                 f"{cfg.data.image_size} differs from model.image_size {cfg.model.image_size}")
    _check_resume(cfg.resume)


def validate_parti(cfg: PartiTrainConfig | DictConfig, world_size: int = 1) -> None:
    """Every check for a stage-2 run (the tokenizer-dependent ones happen when it is loaded)."""
    parti_model.validate(cfg.model)
    validate_data(cfg.data, stage=2)
    validate_optim(cfg.optim)
    validate_trainer(cfg.trainer, world_size)
    warn_schedule(cfg.optim, cfg.trainer.steps)
    check_config(bool(cfg.tokenizer.ckpt), "tokenizer.ckpt",
                 "is empty: train a tokenizer with python train_vqgan.py and pass "
                 "tokenizer.ckpt=<run>/export (or a checkpoint folder)")
    s = cfg.sample
    validate_sampling(SamplingConfig(s.guidance, s.temperature, s.top_k, s.top_p), "sample.")
    e = cfg.eval
    check_config(e.n >= 0, "eval.n", f"{e.n} must be >= 0 (0 = no generation evaluation)")
    check_config(len(e.guidance) > 0, "eval.guidance", "needs at least one guidance scale")
    for guidance in e.guidance:
        validate_sampling(SamplingConfig(guidance, e.temperature, e.top_k, e.top_p, e.candidates),
                          "eval.")
    _check_resume(cfg.resume)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain python types (what checkpoints and TensorBoard store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
