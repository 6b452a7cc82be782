"""`lmdistill quickstart`: the whole distillation path on a laptop CPU (arrives with the training loop)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="lmdistill_quickstart", help="where the run is written")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print(
        "lmdistill quickstart: not yet available. It arrives with the training loop; until then the loss engine\n"
        "is usable from Python: `from lmdistill.losses import distillation_loss, fused_distillation_loss`."
    )
    return 0
