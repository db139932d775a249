"""Checkpoints that survive a kill at any moment, and exported inference weights.

Layout: `<run>/checkpoints/step-0001000/{tensors/, state.pt, rank-000.pt, ..., COMPLETE}`.
`tensors/` holds weights, optimizer moments and EMA with `torch.distributed.checkpoint` (DCP): each
rank writes its own shards, and DCP reshards on load, so a checkpoint written by N ranks (DDP or
FSDP) loads into M ranks of either. `state.pt` (rank 0) holds the rest: step, schedule, config;
`rank-*.pt` each rank's data position and RNG. A checkpoint is written under a hidden temporary
name, marked COMPLETE last, then renamed: a folder named `step-*` with the marker is always whole.
Loading never unpickles objects (`weights_only=True`; DCP may read tensors only).
Exports are `model.safetensors` + `config.yaml` (the config needed to rebuild the model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from parti import distributed
from parti.distributed import Dist

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
TENSORS = "tensors"
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, numpy, python) as weights_only-loadable values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_file_safely(path: Path) -> dict:
    """torch.load with weights_only=True and an error that names the broken file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file missing: {path}") from None
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"checkpoint file {path} holds objects other than tensors and plain containers: "
            "refused (checkpoints load with weights_only=True, which never runs code from a file)"
        ) from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RuntimeError(f"checkpoint file {path} is damaged or not a parti checkpoint: {err}") from err


class TensorsOnlyPlanner(dcp.DefaultLoadPlanner):
    """DCP loading that refuses pickled objects: our checkpoints hold tensors only."""

    def load_bytes(self, read_item, value) -> None:
        raise RuntimeError(f"checkpoint entry {read_item.dest_index.fqn} is a pickled object, not a "
                           "tensor: refused (parti checkpoints hold tensors only)")


def _local() -> bool:
    """DCP without a process group: a single process reads or writes the whole checkpoint."""
    return not dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save and load that it assumes a single process; it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_tensors(folder: Path, template: dict) -> None:
    """Fill `template` (nested dicts of tensors, DTensors for shards) in place from a DCP folder."""
    try:
        with _quiet_single_process():
            dcp.load(template, checkpoint_id=str(folder), planner=TensorsOnlyPlanner(),
                     no_dist=_local())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint tensors missing: {folder}") from None
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any failure: name the folder
        raise RuntimeError(f"checkpoint tensors in {folder} are damaged or do not match this model: "
                           f"{err}") from err


def read_tensors(folder: Path, path: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The flat tensor dict saved at `path` (e.g. ("ema",)) of a DCP folder, whole, in this process
    alone (no process group, no model needed): inference from a checkpoint folder."""
    prefix = ".".join(path) + "."
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    flat = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.items() if key.startswith(prefix)}
    nested: dict = flat
    for part in reversed(path):
        nested = {part: nested}
    with _quiet_single_process():
        dcp.load(nested, checkpoint_id=str(folder), planner=TensorsOnlyPlanner(), no_dist=True)
    return flat


def read_shared(path: Path) -> dict:
    """The rank-0 state (step, schedule, config, ...) of a complete checkpoint folder."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    shared = load_file_safely(path / "state.pt")
    if not (path / TENSORS).is_dir() or "has_ema" not in shared:
        raise RuntimeError(
            f"{path} is a checkpoint of an older parti (weights inside state.pt, no {TENSORS}/ "
            "folder): resume it with the parti that wrote it, or start a new run_dir")
    return shared


class Checkpointer:
    """Saves step folders, keeps the newest `keep_last`, finds the newest complete one."""

    def __init__(self, run_dir: Path, keep_last: int, dist: Dist):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:07d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, shared: dict, per_rank: dict, tensors: dict) -> Path:
        """Write `tensors` (every rank its shards), `shared` (rank 0) and every rank's `per_rank`
        state for `step`; collective."""
        final = self.path(step)
        if final.is_dir() and (final / MARKER).is_file():
            return final
        tmp = self.root / f".tmp-{final.name}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        with _quiet_single_process():
            dcp.save(tensors, checkpoint_id=str(tmp / TENSORS), no_dist=_local())
        torch.save(per_rank, tmp / f"rank-{self.dist.rank:03d}.pt")
        if self.dist.is_main:
            torch.save(shared, tmp / "state.pt")
        _fsync_files(tmp)  # on disk before the marker says so, on every rank (node)
        distributed.barrier()
        if self.dist.is_main:
            marker = {"step": step, "world_size": self.dist.world_size}
            with open(tmp / MARKER, "w") as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        distributed.barrier()
        return final

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename this run's complete checkpoints past `step` to `step-N.superseded-<time>`, on
        rank 0 (collective): a run resumed from an older checkpoint starts a new history, whose
        saves would otherwise be skipped as done and a later resume=auto would take the abandoned
        one. Renamed, not deleted: renaming one back returns to it."""
        later = [p for p in self.complete() if int(STEP_DIR.match(p.name).group(1)) > step]
        if self.dist.is_main and later:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for path in later:
                os.replace(path, path.with_name(f"{path.name}.superseded-{stamp}"))
            log.warning(f"resumed at step {step}: the later checkpoints "
                        f"{', '.join(p.name for p in later)} in {self.root} are set aside as "
                        f"<name>.superseded-{stamp} (rename one back to return to it)")
        distributed.barrier()
        return later

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, tensors: dict) -> dict | None:
        """Fill `tensors` in place (collective) and return this rank's state (data position,
        RNG), or None when the checkpoint was written by another number of ranks: weights and
        optimizer reshard, per-rank streams cannot."""
        path = Path(path)
        load_tensors(path / TENSORS, tensors)
        saved_world = json.loads((path / MARKER).read_text())["world_size"]
        if saved_world != self.dist.world_size:
            if self.dist.is_main:
                log.warning(f"{path} was written by {saved_world} ranks, this run has "
                            f"{self.dist.world_size}: weights, optimizer, schedule and step are "
                            "restored; each rank's data stream and RNG start afresh")
            return None
        return load_file_safely(path / f"rank-{self.dist.rank:03d}.pt")


def _fsync_files(folder: Path) -> None:
    """Flush every file under `folder` to disk (a crash after a rename must not leave a marker
    in front of empty files)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_weights(out_dir: Path, state_dict: dict, config: dict) -> Path:
    """Write inference weights (safetensors) and the model config into a temporary folder, flush
    it, then swap it in: an existing export is renamed aside before and deleted after, so a
    crash leaves the old export, the new one, or both (`.old-<name>` beside a complete
    `.tmp-<name>`), never a half-written one."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # clone: tied weights share storage, which safetensors refuses; each name gets its own copy
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    OmegaConf.save(OmegaConf.create(config), tmp / "config.yaml")
    _fsync_files(tmp)
    old = out_dir.with_name(f".old-{out_dir.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_export(path: Path) -> tuple[dict, dict]:
    """(state_dict, config) from an export folder, or from a checkpoint folder of the same run."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        return load_file(str(path / "model.safetensors")), config
    if (path / MARKER).is_file():
        shared = read_shared(path)
        where = ("ema",) if shared["has_ema"] else ("units", "model", "model")
        return read_tensors(path / TENSORS, where), shared["export_config"]
    raise FileNotFoundError(
        f"{path} is neither an export folder (model.safetensors + config.yaml) nor a complete "
        "checkpoint folder (step-N with a COMPLETE marker)")
