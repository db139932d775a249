"""Stage 1: train the ViT-VQGAN image tokenizer.

    python train_vqgan.py                                    # tiny tokenizer on the built-in shapes data
    python train_vqgan.py -m lr=1e-4,3e-4                    # Hydra multirun sweep, one folder per run
    torchrun --nproc_per_node 2 train_vqgan.py               # DDP (gloo on CPU, nccl on CUDA)
    python train_vqgan.py model=vitvqgan_small data=wds data.train_shards='/data/{00000..01023}.tar' \
        data.eval_shards=/data/val.tar loss.perceptual_backbone=vgg loss.perceptual_weights=/w/vgg16.pth
    python train_vqgan.py run_dir=outputs/vqgan/2026-11-28_10-00-00   # continue that run (resume=auto)

Reads top to bottom: setup, first-run data, build, resume, loop, export.
"""

import hydra
from omegaconf import DictConfig

from parti import distributed
from parti.config import register_configs, validate_vqgan
from parti.data.shapes_dataset import prepare_shapes
from parti.training.stage1 import VQGANTask
from parti.training.trainer import Trainer, start_run

register_configs()


@hydra.main(config_path="conf", config_name="train_vqgan", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run = start_run(cfg, validate_vqgan)
    prepare_shapes(cfg.data, run.dist)  # data.generate: write the shapes data set if missing
    task = VQGANTask(run)
    trainer = Trainer(run, task)
    trainer.resume()
    metrics = trainer.fit()
    if metrics:
        trainer.export(run.run_dir / "export")
    del trainer, task  # freed while the process group exists (see distributed.shutdown)
    distributed.shutdown()
    return metrics.get("eval/psnr", float("nan"))


if __name__ == "__main__":
    main()
