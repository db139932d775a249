"""Stage 2: train the Parti encoder-decoder from text tokens to image tokens.

    python train_parti.py                                   # parti_tiny on the shapes token shards
    torchrun --nproc_per_node 2 train_parti.py              # DDP on this CPU (gloo)
    torchrun --nproc_per_node 8 train_parti.py model=parti_350m data=wds optim=adafactor \
        data.token_train_shards='/data/tokens/{00000..01022}.tar' data.token_eval_shards=/data/tokens/01023.tar \
        data.text_tokenizer=/data/text.model tokenizer.ckpt=outputs/vqgan/<run>/export trainer.steps=450000
    python train_parti.py data.encode_on_the_fly=true       # encode image shards with the tokenizer

Reads top to bottom: setup, first-run data, build, resume, loop, export.
"""

import hydra
from omegaconf import DictConfig

from parti import distributed
from parti.config import register_configs, validate_parti
from parti.data.shapes_dataset import prepare_shapes
from parti.training.stage2 import PartiTask
from parti.training.trainer import Trainer, start_run

register_configs()
MAKE_TOKENIZER = ("Train an image tokenizer first: python train_vqgan.py experiment=demo_vqgan "
                  "writes outputs/demo/vqgan/export (the default), or pass "
                  "tokenizer.ckpt=<run>/export of any stage-1 run")


@hydra.main(config_path="conf", config_name="train_parti", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run = start_run(cfg, validate_parti, inputs={"tokenizer.ckpt": MAKE_TOKENIZER})
    prepare_shapes(cfg.data, run.dist)  # data.generate: write the shapes data set if missing
    task = PartiTask(run)
    trainer = Trainer(run, task)
    trainer.resume()
    metrics = trainer.fit()
    if metrics:
        trainer.export(run.run_dir / "export")
    del trainer, task  # freed while the process group exists (see distributed.shutdown)
    distributed.shutdown()
    return metrics.get("eval/loss_true_caption", float("nan"))


if __name__ == "__main__":
    main()
