"""Rank-0 logging: TensorBoard scalars, image grids and text, a log file, a console progress bar.

Other ranks get a logger that does nothing, so no call site needs an `if rank == 0`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from tqdm import tqdm

from parti.eval.grid import labelled_grid

log = logging.getLogger("parti")


def flatten_hparams(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> {"model.dim": 128, ...}: numbers, strings and bools as they are, the rest
    (lists, None) as strings."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_hparams(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


class RunLogger:
    """Writes to `<run>/tb` (TensorBoard) and `<run>/train.log` when `enabled` (rank 0)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress: bool):
        self.enabled = enabled
        # A resumed run logs the steps after its checkpoint again: TensorBoard drops the earlier
        # events from start_step + 1 on (those of the interrupted or rolled-back history).
        purge = start_step + 1 if start_step > 0 else None
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge) if enabled else None
        self.bar = None
        if enabled:
            handler = logging.FileHandler(Path(run_dir) / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False  # the console gets each line once, through the progress bar
            self._handler = handler
            if progress:
                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                                file=sys.stderr, mininterval=1.0)

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)
            log.info(message)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def images(self, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> None:
        """images: (N, 3, H, W) in [-1, 1]."""
        if self.writer is not None:
            from torchvision.utils import make_grid  # torchvision costs ~2 s to import: when used

            grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow,
                             normalize=True, value_range=(-1, 1))
            self.writer.add_image(tag, grid, step)

    def labelled_images(self, tag: str, images: torch.Tensor, labels: Sequence[str],
                        step: int) -> None:
        """images: (len(labels) * K, 3, H, W) in [-1, 1]; K per row, each row headed by its label."""
        if self.writer is not None:
            grid = labelled_grid(images, labels, per_row=len(images) // max(1, len(labels)))
            self.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, config: dict, metrics: dict[str, float]) -> None:
        """The run's flattened config with its final metrics, for TensorBoard's HPARAMS tab.

        Written into `<run>/tb` itself (not a sub-run as `add_hparams` does), so the metrics are
        the run's own `eval/...` scalars and the runs of a sweep line up side by side.
        """
        if self.writer is not None:
            for summary in hparams_summaries(flatten_hparams(config), metrics):
                self.writer.file_writer.add_summary(summary)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            log.removeHandler(self._handler)
            self._handler.close()
