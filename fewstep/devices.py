"""Where a command runs and in what precision: `--device auto|cpu|cuda|cuda:N` and `--dtype auto|fp32|bf16|fp16`,
checked once with one-line errors and resolved the same way by every command and API function.

auto device: the current CUDA device when one is available, else the CPU. auto dtype: bf16 for diffusers
pipelines (and students made from them) on CUDA (fp16 on GPUs without bf16), fp32 for everything else (the
built-in teachers are small and their quality numbers were measured in fp32).
"""

from __future__ import annotations

import re

import torch

from fewstep.errors import FewstepError

DEVICE_HELP = "auto | cpu | cuda | cuda:N (default auto: CUDA when available, else the CPU)"
DTYPE_HELP = ("auto | fp32 | bf16 | fp16: the precision the networks run in (default auto: bf16 for diffusers "
              "pipelines on CUDA, fp32 otherwise)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device of `spec` (None = auto); a CUDA device that is not there is a one-line error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = _CUDA.match(text)
    if m is None:
        raise FewstepError(f"unknown --device {spec!r}; allowed: {DEVICE_HELP.split(' (')[0]}")
    if not torch.cuda.is_available():
        raise FewstepError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise FewstepError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def check_dtype(spec: str | torch.dtype | None) -> None:
    """A one-line error unless `spec` is None, auto, a dtype name (fp32, bf16, fp16) or one of those dtypes."""
    if spec is None or isinstance(spec, torch.dtype) and spec in DTYPE_NAMES:
        return
    if isinstance(spec, torch.dtype) or str(spec).strip().lower() not in ("auto", *DTYPES):
        raise FewstepError(f"unknown --dtype {str(spec)!r}; allowed: auto, {', '.join(DTYPES)}")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, *, diffusers: bool) -> torch.dtype:
    """The dtype of `spec` (None = auto) for a model on `device`; `diffusers`: a diffusers pipeline or its student."""
    check_dtype(spec)
    if isinstance(spec, torch.dtype):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        device = torch.device(device)
        if not diffusers or device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if _bf16_supported(device) else torch.float16
    return DTYPES[text]


def _bf16_supported(device: torch.device) -> bool:
    """Whether the CUDA device computes in bf16 natively (Ampere and later; V100 and T4 do not: fp16 there)."""
    try:
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except (RuntimeError, AssertionError, TypeError):
        return True


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16, fp16 (or torch's name for another dtype)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


__all__ = ["DEVICE_HELP", "DTYPES", "DTYPE_HELP", "check_dtype", "dtype_name", "resolve_device", "resolve_dtype"]
