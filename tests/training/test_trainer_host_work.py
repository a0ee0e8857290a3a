"""What the trainer does around the network calls (issue 21): one host sync per phase, EMA parameter lists built once
per run, and the AdamW update kernel chosen by device (fused on CUDA, foreach on the CPU; a resumed run keeps its
own device's choice)."""

from __future__ import annotations

import json

import torch

from fewstep.training.ema import ema_pairs, ema_update
from fewstep.training.optim import adamw_kernel, make_optimizer
from fewstep.training.run import plan_run
from fewstep.training.trainer import Trainer

FAST = dict(teacher="toy:checkerboard", batch_size=16, eval=False, sample_every=0, checkpoint_every=0, log_every=1,
            warmup=0)


def _trainer(tmp_path, **kw):
    values = {**FAST, "out": str(tmp_path / "run"), **kw}
    plan = plan_run(values, explicit=set(values))
    return Trainer(plan.config, teacher=plan.teacher, method=plan.method, reloadable_teacher=True)


def _count_host_reads(monkeypatch, trainer) -> dict:
    """Count tensor -> Python conversions (item, tolist, float, int, bool) made by the trainer's own code, not by the
    method's loss or the optimizer (their CPU-only reads are not device syncs)."""
    counts = {"n": 0}
    inside = {"depth": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if inside["depth"] == 0:
                counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def quiet(fn):
        def wrapped(*a, **k):
            inside["depth"] += 1
            try:
                return fn(*a, **k)
            finally:
                inside["depth"] -= 1
        return wrapped

    trainer.method.loss = quiet(trainer.method.loss)
    for opt in trainer.opts.values():
        opt.step = quiet(opt.step)
    return counts


def test_one_host_sync_per_phase(tmp_path, monkeypatch):
    for method in ("cd", "tdm"):  # one phase; a critic phase every iteration and a generator phase every 2nd
        tr = _trainer(tmp_path / method, method=method, iters=100)
        tr.cfg.stop_after = 1
        tr.train()  # first iteration (and the end-of-call checkpoint) outside the count
        counts = _count_host_reads(monkeypatch, tr)
        seen: list[dict] = []
        tr.progress = lambda it, total, losses, seen=seen: seen.append(dict(losses))
        tr.cfg.stop_after = 3
        monkeypatch.setattr(tr, "save_checkpoint", lambda: None)
        tr.train()
        monkeypatch.undo()
        phases = sum(it % ph.every == 0 for it in (1, 2, 3) for ph in tr.phases)
        assert counts["n"] == phases, (method, counts)
        # the progress callback and the log still get every loss as a Python float
        assert len(seen) == 3 and all(isinstance(v, float) for v in seen[-1].values())
        last = json.loads((tmp_path / method / "run" / "log.jsonl").read_text().splitlines()[-1])
        assert last["iteration"] == 4 and last["losses"] and set(last["losses"]) <= set(seen[-1])


def test_ema_lists_are_built_once_per_train_call(tmp_path, monkeypatch):
    import fewstep.training.trainer as trainer_module

    built = []
    monkeypatch.setattr(trainer_module, "ema_pairs", lambda ema, model: built.append(1) or ema_pairs(ema, model))
    tr = _trainer(tmp_path, method="cd", iters=100)  # the EMA target role and the student's EMA
    tr.cfg.stop_after = 4
    tr.train()
    assert len(built) == 2


def test_ema_update_with_lists_matches_without():
    torch.manual_seed(0)
    model, a = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ema_update(a, model, 0.9)
    ema_update(b, model, 0.9, pairs=ema_pairs(b, model))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.weight, model.weight)


def test_adamw_kernel_by_device():
    cpu = [torch.zeros(2, requires_grad=True)]
    assert adamw_kernel(cpu) == {"foreach": True, "fused": None}
    group = make_optimizer("adamw", cpu, lr=0.1).param_groups[0]
    assert group["foreach"] is True and not group["fused"]
    if torch.cuda.is_available():
        gpu = [torch.zeros(2, device="cuda", requires_grad=True)]
        assert adamw_kernel(gpu) == {"fused": True, "foreach": None}
        assert adamw_kernel(gpu + cpu)["foreach"] is True  # mixed devices: foreach
        assert make_optimizer("adamw", gpu, lr=0.1).param_groups[0]["fused"] is True


def test_resume_keeps_this_devices_kernel(tmp_path):
    from fewstep.training import distill

    out = tmp_path / "run"
    distill(method="cd", out=str(out), iters=4, stop_after=2, **FAST)
    meta_path = next((out / "checkpoints").iterdir()) / "state.json"
    meta = json.loads(meta_path.read_text())
    for group in meta["optimizers"]["student"]["param_groups"]:  # as if written by a CUDA run
        assert group["foreach"] is True
        group.update(fused=True, foreach=None)
    meta_path.write_text(json.dumps(meta))
    values = {"out": str(out), "stop_after": 1}
    plan = plan_run(values, explicit=set(values), resume=True)
    tr = Trainer(plan.config, resume=True)
    group = tr.opts["student"].param_groups[0]
    assert group["foreach"] is True and not group["fused"]
    tr.train()
