"""Run by torchrun in tests: one step's gradients with the student sharded by FSDP2 (`fully_shard`).

accelerate runs FSDP only on GPUs (on CPU it falls back to DDP), so this worker shards the student itself to
exercise what FSDP changes for the loop: sharded DTensor parameters, the lm_head gathered outside forward,
and gradient averaging over ranks. Rank 0 saves the full gradients.
"""

import os
import sys

import torch
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_args import make_plan  # noqa: E402

from lmdistill.train.loop import Trainer  # noqa: E402

if __name__ == "__main__":
    out, command, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    trainer = Trainer(make_plan(command, argv))
    model = trainer.acc.unwrap_model(trainer.model)
    for layer in model.model.layers:
        fully_shard(layer)
    trainer.model = fully_shard(model)
    trainer.accumulate(trainer.micro_batches(0))
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if trainer.acc.is_main_process:
        torch.save(grads, out)
    trainer.close()
    # A rank has rarely aborted with "terminate called without an active exception" (C++ threads destroyed at
    # teardown); leaving with os._exit once the process group is closed skips the interpreter's teardown. An abort
    # before this point still fails the run, as it should.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
