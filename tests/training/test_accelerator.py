"""Devices and processes: the process group is torn down after the garbage that holds it is collected."""

from __future__ import annotations

import gc


def test_garbage_holding_the_group_is_collected_while_the_group_is_up():
    """A DDP module left in a reference cycle by an earlier run holds the process group; destroying the group
    first and leaving the cycle to interpreter finalization aborted a finished rank now and then (SIGABRT,
    "terminate called without an active exception"). Such garbage goes while the group is still up."""
    import torch.distributed as dist

    from fewstep.training.accelerator import destroy_process_group

    seen = []

    class HoldsTheGroup:
        def __del__(self):
            seen.append(dist.is_initialized())

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    was_enabled = gc.isenabled()
    gc.disable()  # only an explicit collection frees the cycle below
    try:
        holder = HoldsTheGroup()
        holder.cycle = holder
        del holder
        destroy_process_group()
    finally:
        if was_enabled:
            gc.enable()
    assert seen == [True] and not dist.is_initialized()
