"""Generate images from prompts with a trained stage-2 model: one PNG per sample, a labelled grid.

    python sample.py                                        # the demo model and prompts
    python sample.py ckpt=outputs/parti/<run>/export prompts='[a red circle above a blue square]'
    python sample.py prompts_file=prompts.txt samples_per_prompt=8 top_p=0.9 candidates=4 out=samples/

Image j of a prompt depends only on (prompt, seed, j): the same in any batch. Reads top to bottom:
check, load, sample, save, score.
"""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from parti.eval.grid import labelled_grid, save_each, slug
from parti.eval.shapes_judge import judge_batch
from parti.eval.tokenizer import is_shapes_caption
from parti.models.loading import load_parti
from parti.sampling import SamplingConfig, generate, read_prompts, validate_sampling


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    sampling = SamplingConfig(guidance=float(cfg.guidance), temperature=float(cfg.temperature),
                              top_k=int(cfg.top_k), top_p=float(cfg.top_p),
                              candidates=int(cfg.candidates), compile=cfg.compile,
                              compile_mode=cfg.compile_mode)
    validate_sampling(sampling)
    if cfg.samples_per_prompt < 1 or cfg.batch_size < 1:
        raise ValueError("config error: samples_per_prompt and batch_size must be >= 1, got "
                         f"{cfg.samples_per_prompt} and {cfg.batch_size}")
    prompts = read_prompts(cfg.prompts, cfg.prompts_file)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text_tokenizer, image_tokenizer = load_parti(cfg.ckpt, device)
    per_prompt = cfg.samples_per_prompt
    rows = [p for p in prompts for _ in range(per_prompt)]
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        images = generate(model, text_tokenizer, image_tokenizer, rows, sampling, cfg.seed,
                          samples=list(range(per_prompt)) * len(prompts),
                          batch_size=cfg.batch_size).images
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "samples"
    save_each(images, [f"{i:03d}_{slug(p)}_{j}" for i, p in enumerate(prompts)
                       for j in range(per_prompt)], out)
    labelled_grid(images, prompts, per_prompt).save(out / "grid.png")
    print(f"wrote {out}/ ({len(prompts)} prompts x {per_prompt} samples + grid.png; guidance "
          f"{cfg.guidance}, temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, "
          f"candidates {cfg.candidates}, seed {cfg.seed})")
    scores = {}
    if cfg.judge and all(is_shapes_caption(p) for p in prompts):
        scores = judge_batch(images.cpu(), rows)
        print("shapes judge (fraction of samples that show it): " + " ".join(
            f"{k}={v:.3f}" for k, v in sorted(scores.items())))
    return scores


if __name__ == "__main__":
    main()
