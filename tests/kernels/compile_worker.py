"""Compiles the Triton attention kernel ahead of time for NVIDIA GPUs, without a GPU.

Triton ships its NVIDIA backend and ptxas, so the compiled (non-interpreted) kernel can be built for
sm_80/sm_90 on a CPU-only machine. This checks what the interpreter cannot: that the kernel passes
Triton's compiler with the tile sizes `_launch_config` picks, and how many registers/spill bytes ptxas
reports. Runs in its own process because a compiler crash aborts the process:

    python compile_worker.py 90:bfloat16:64:jvp 80:float16:80:fwd 90:bfloat16:128:tan   # a JSON line each
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch


def compile_kernel(arch: int, dtype: str, head_dim: int, mode: str, tiles=None) -> dict:
    """mode: fwd (plain forward), jvp (o and its tangent), tan (tangent given o); tiles (BLOCK_M, BLOCK_N, warps,
    stages): `_launch_config`'s by default."""
    with_jvp, compute_o = mode != "fwd", mode != "tan"
    import triton
    from fewstep_kernels import flash_attention as fa
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not fa.INTERPRETED, "compile with TRITON_INTERPRET unset"
    tdtype = getattr(torch, dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))

    class FakeCuda:  # _launch_config asks for the device's compute capability
        type, index = "cuda", 0

    fa._capability.cache_clear()
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda index=None: (arch // 10, arch % 10)
    try:
        bm, bn, warps, stages = tiles or fa._launch_config(block_d, FakeCuda(), 4096, 4096, tdtype, with_jvp,
                                                           compute_o)
    finally:
        torch.cuda.get_device_capability = real
        fa._capability.cache_clear()
    kernel = fa._attention_fwd_kernel
    pointer = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype]
    constants = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "WITH_JVP": with_jvp, "COMPUTE_O": compute_o,
                 "DOT_MODE": fa._dot_mode(tdtype, torch.device("cuda"))}
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO"):
            signature[name] = pointer
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    usage = {"regs": None, "stack": None}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(compiled.asm["cubin"])
            fh.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", out)
        if m:
            usage = {"regs": int(m.group(1)), "stack": int(m.group(2))}
    return {"arch": arch, "dtype": dtype, "head_dim": head_dim, "mode": mode, "tiles": [bm, bn, warps, stages],
            "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]), **usage}


if __name__ == "__main__":
    # SPEC: arch:dtype:head_dim:mode[:BLOCK_M,BLOCK_N,warps,stages]
    for spec in sys.argv[1:]:
        arch, dtype, head_dim, mode, *tiles = spec.split(":")
        tiles = tuple(int(n) for n in tiles[0].split(",")) if tiles else None
        print(json.dumps(compile_kernel(int(arch), dtype, int(head_dim), mode, tiles)), flush=True)
