"""Run by torchrun in tests: one step's gradients of `lmdistill distill` options, saved by rank 0."""

import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_args import make_plan  # noqa: E402

from lmdistill.train.loop import Trainer  # noqa: E402

if __name__ == "__main__":
    out, command, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    trainer = Trainer(make_plan(command, argv))
    trainer.accumulate(trainer.micro_batches(0))
    if trainer.acc.is_main_process:
        model = trainer.acc.unwrap_model(trainer.model)
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    trainer.close()
    # A rank has rarely aborted with "terminate called without an active exception" (C++ threads destroyed at
    # teardown); leaving with os._exit once the process group is closed skips the interpreter's teardown. An abort
    # before this point still fails the run, as it should.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
