"""Run by test_trainer.py under torchrun with 2 CPU processes: a few CD iterations, then each rank
writes a digest of its weights."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from fewstep.training.report import finish_run
from fewstep.training.run import prepare_run, write_config
from fewstep.training.trainer import Trainer


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
    finish_run(tr)
    from fewstep.training import accelerator

    assert accelerator._exit_hook_registered  # the gloo group is torn down at exit, while Python is alive
    Path(out, f"rank{tr.rank}.json").write_text(json.dumps({
        "world_size": tr.world, "student": digest(tr.student.net), "ema": digest(tr.ema.net),
        "teacher": teacher, "first_batch": hashlib.sha256(first.numpy().tobytes()).hexdigest()}))


def resume_check(root: str) -> None:
    """An uninterrupted 2-process run and one stopped after 2 iterations then resumed: same weights."""
    from fewstep.training import distill

    kw = dict(method="cd", teacher="toy:checkerboard", iters=5, batch_size=16, eval=False, sample_every=0,
              warmup=1, checkpoint_every=0)
    distill(out=f"{root}/full", **kw)
    first = distill(out=f"{root}/split", stop_after=2, **kw)
    assert first["iterations"] == 2 and not first["finished"]
    distill(out=f"{root}/split", resume=True)


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume_check(sys.argv[2])
    else:
        main(sys.argv[1])
