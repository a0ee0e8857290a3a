"""Run by test_trainer.py under torchrun with 2 CPU processes: a few CD iterations, then each rank
writes a digest of its weights."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from fewstep.training.trainer import Trainer, prepare_run, write_config


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: str) -> None:
    from accelerate.state import PartialState

    state = PartialState(cpu=True)
    values = dict(method="cd", teacher="toy:checkerboard", iters=5, batch_size=32, out=out, eval=False,
                  sample_every=0, warmup=1)
    cfg = prepare_run(values, explicit=set(values), check_out=state.is_main_process)
    if state.is_main_process:
        write_config(cfg)
    state.wait_for_everyone()
    tr = Trainer(cfg)
    first = tr._batch().x0
    tr.gen.set_state(torch.Generator().manual_seed(cfg.seed * 1_000_003 + tr.rank + 1).get_state())
    teacher = digest(tr.teacher.net)
    tr.train()
    tr.finish()
    Path(out, f"rank{tr.rank}.json").write_text(json.dumps({
        "world_size": tr.world, "student": digest(tr.student.net), "ema": digest(tr.ema.net),
        "teacher": teacher, "first_batch": hashlib.sha256(first.numpy().tobytes()).hexdigest()}))


if __name__ == "__main__":
    main(sys.argv[1])
