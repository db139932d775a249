"""Generate images from prompts with a trained stage-2 model; write a PNG grid, score shapes prompts.

    python sample.py                                        # the demo model and prompts
    python sample.py ckpt=outputs/parti/<run>/export prompts='[a red circle above a blue square]' guidance=3
    python sample.py samples_per_prompt=8 temperature=0.9 top_k=64 out=grid.png

Reads top to bottom: load, sample, save, score.
"""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from parti.eval.shapes_judge import judge_batch
from parti.models.loading import load_parti
from parti.sampling import generate_images


def shapes_prompts(prompts: list[str]) -> bool:
    """Whether every prompt is a caption the shapes judge understands."""
    from parti.data.shapes import parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text_tokenizer, image_tokenizer = load_parti(cfg.ckpt, device)
    prompts = [p for p in cfg.prompts for _ in range(cfg.samples_per_prompt)]
    generator = torch.Generator(device).manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        images = generate_images(model, text_tokenizer, image_tokenizer, prompts, cfg.guidance,
                                 cfg.temperature, cfg.top_k, generator)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "samples.png"
    save_image((images.float() + 1) / 2, out, nrow=cfg.samples_per_prompt, padding=2)
    print(f"wrote {out} ({len(cfg.prompts)} prompts x {cfg.samples_per_prompt} samples, "
          f"guidance {cfg.guidance})")
    scores = {}
    if cfg.judge and shapes_prompts(list(cfg.prompts)):
        scores = judge_batch(images.cpu(), prompts)
        print("shapes judge (fraction of samples that show it): " + " ".join(
            f"{k}={v:.3f}" for k, v in sorted(scores.items())))
    return scores


if __name__ == "__main__":
    main()
