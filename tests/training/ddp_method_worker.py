"""Run by test_ddp_methods.py under `accelerate launch` with 2 CPU processes: a few iterations of one method,
then each rank writes a digest of every network it trained (they must agree across ranks)."""

import json
import sys
from pathlib import Path

from ddp_worker import digest  # the script's own folder is on sys.path


def main(method: str, out: str, options: str) -> None:
    from accelerate.state import PartialState

    from fewstep.training.run import prepare_run, write_config
    from fewstep.training.trainer import Trainer

    state = PartialState(cpu=True)
    values = dict(method=method, teacher="digits", iters=4, batch_size=4, out=out, eval=False, sample_every=0,
                  warmup=1, options=json.loads(options))
    cfg = prepare_run(values, explicit=set(values), check_out=state.is_main_process)
    if state.is_main_process:
        write_config(cfg)
    state.wait_for_everyone()
    tr = Trainer(cfg)
    tr.train()
    digests = {name: digest(role.module) for name, role in tr.roles.items() if role.trainable}
    Path(out, f"rank{tr.rank}.json").write_text(json.dumps({"world_size": tr.world, "nets": digests}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
