"""Print the final metrics of finished runs as a table: `python -m parti.eval.report RUN_DIR...`.

Each run folder holds the `metrics.json` its trainer wrote after the final evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def report(run_dirs: list[Path]) -> str:
    """One block per run: its metrics, one per line."""
    lines = []
    for run in run_dirs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: has the run in {run} finished?")
        metrics = json.loads(path.read_text())
        lines.append(f"{run} (step {metrics.pop('step')})")
        width = max(len(k) for k in metrics)
        lines += [f"  {key:<{width}}  {value:.4f}" for key, value in sorted(metrics.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parti.eval.report", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    print(report(parser.parse_args(argv).runs))


if __name__ == "__main__":
    main()
