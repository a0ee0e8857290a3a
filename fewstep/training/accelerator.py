"""Devices and processes: the one place fewstep resets accelerate's global state and makes its Accelerator.

`process_state(device)` gives the process group of a run (on CPU, several processes launched with
`accelerate launch` or torchrun only form a group with cpu=True); `make_accelerator` the Accelerator the
trainer trains with. Both start accelerate afresh when an earlier run in the same single process asked for
another device (`reset_single_process_state`). A multi-process run tears its process group down at exit.
"""

from __future__ import annotations

import torch

from fewstep.errors import FewstepError


def use_cpu(device: str) -> bool:
    """Whether a run with --device `device` (auto | cpu | cuda) trains on the CPU."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def reset_single_process_state(cpu: bool) -> None:
    """A second run in the same (single) process may ask for another device or precision: drop accelerate's
    accelerator state, and its process state too when the device type changes. A launched group keeps both."""
    from accelerate.state import AcceleratorState, PartialState

    if not PartialState._shared_state:
        return
    state = PartialState()
    if state.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=(state.device.type == "cpu") != cpu)


def process_state(device: str = "auto"):
    """accelerate's PartialState for a run on `device` (rank, world size, barriers)."""
    from accelerate.state import PartialState

    cpu = use_cpu(device)
    reset_single_process_state(cpu)
    return PartialState(cpu=cpu)


def make_accelerator(device: str = "auto", mixed_precision: str = "no"):
    """The Accelerator a run trains with; refuses CUDA without a device, and FSDP/DeepSpeed configurations
    (checkpoints and EMAs read the unsharded modules: single-process and DDP runs only, so far)."""
    from accelerate import Accelerator

    cpu = use_cpu(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise FewstepError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    reset_single_process_state(cpu)
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    if acc.num_processes > 1:
        destroy_process_group_at_exit()
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise FewstepError(f"accelerate is configured for {acc.distributed_type.name}; fewstep distill supports "
                           "single-process and DDP (multi-GPU or multi-CPU) runs for now")
    if (acc.device.type == "cpu") != cpu:
        raise FewstepError(f"accelerate chose {acc.device} but the run asks for {'cpu' if cpu else 'cuda'}")
    return acc


def destroy_process_group() -> None:
    """Tear down torch.distributed's default process group if one is up (a no-op otherwise). Unreachable
    objects are collected first: a DDP module left in a reference cycle by an earlier run holds the group, and
    would otherwise free it during interpreter finalization."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import gc

        gc.collect()
        torch.distributed.destroy_process_group()


_exit_hook_registered = False


def destroy_process_group_at_exit() -> None:
    """Register (once) destroy_process_group to run at exit, while the interpreter is still alive: a process
    that exits with its gloo group up can abort at finalization ("terminate called without an active
    exception", SIGABRT), failing a finished run."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        import atexit

        atexit.register(destroy_process_group)
        _exit_hook_registered = True
