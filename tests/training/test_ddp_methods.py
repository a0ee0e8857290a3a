"""Three-network methods under DDP (2 CPU processes over gloo): DMD2 with its GAN head (the fake score runs
several forwards per phase, some only to its bottleneck) and TDM end with identical networks on both ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

from fewstep.teachers import load_teacher


@pytest.mark.parametrize("method,options", [("dmd2", {"gan": True, "update_ratio": 2, "steps": 2}), ("tdm", {})])
def test_two_processes_train_identical_networks(tmp_path, method, options):
    script = Path(__file__).with_name("ddp_method_worker.py")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), method, str(run), json.dumps(options)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    expected = {"student", "fake_score"} | ({"discriminator"} if options.get("gan") else set())
    assert set(a["nets"]) == expected and a["nets"] == b["nets"]
    # and the student moved away from the teacher (digest of the teacher's network, computed the same way)
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_worker", script.with_name("ddp_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    teacher = load_teacher("digits")
    from fewstep.methods import get_method

    student = get_method(method)(teacher).student_from_teacher()
    assert a["nets"]["student"] != worker.digest(student)
