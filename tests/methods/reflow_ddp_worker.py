"""Run by test_reflow.py under accelerate launch with 2 CPU processes: a short 2-round reflow run in which each
rank makes its share of every round's pair shards; rank 0 writes the result."""

import json
import sys
from pathlib import Path

from fewstep.training import distill

OPTIONS = {"pair_num": 48, "pair_steps": 3, "pair_shard_size": 8, "straightness_num": 16, "straightness_steps": 3,
           "rounds": 2}


def main(out: str) -> None:
    from accelerate.state import PartialState

    res = distill(method="reflow", teacher="toy:checkerboard", iters=4, batch_size=8, eval=False, sample_every=0,
                  warmup=1, out=out, options=OPTIONS)
    state = PartialState()
    if state.is_main_process:
        result = {"world_size": state.num_processes, "options": OPTIONS, **res}
        Path(out, "result.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
