"""Compile every Triton kernel specialisation the optimizer launches for one CUDA capability,
ahead of time and without a GPU; print one JSON line per specialisation. Run as a script with
TRITON_INTERPRET unset (the interpreter patches triton.language for the whole process):

    python tests/triton_aot_compile.py 90
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

APPROXIMATE = ("sqrt.approx", "div.approx", "div.full", "rsqrt.approx", "rcp.approx")


def block_index_widened(ttir: str) -> bool:
    """Whether the block index (program id along axis 0) is sign-extended to 64 bits."""
    match = re.search(r"(%[\w.]+) = tt\.get_program_id x : i32", ttir)
    return match is not None and re.search(rf"arith\.extsi {re.escape(match.group(1))} : i32 to i64", ttir) is not None


def specialisations():
    """(name, kernel, signature, constexprs, uses_sqrt) for every launch the optimizer makes.
    Integer arguments are i32, as Triton's launcher types them whenever they fit: the block
    offsets must then be widened inside the kernel."""
    import triton

    from triton_kernels.masked_scale import BLOCK_M as MS_M
    from triton_kernels.masked_scale import BLOCK_N as MS_N
    from triton_kernels.masked_scale import _masked_scale_kernel
    from triton_kernels.rotated_stats import BLOCK_M as RS_M
    from triton_kernels.rotated_stats import BLOCK_N as RS_N
    from triton_kernels.rotated_stats import _rotated_stats_kernel

    for dtype, eps_zero, power_one in itertools.product(["fp32", "bf16"], [False, True], [False, True]):
        sig = {"mt_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "lam_l_ptr": "*fp32", "lam_r_ptr": "*fp32",
               "thr_ptr": "*fp32", "chi_ptr": "*fp32", "m": "i32", "n": "i32", "eps": "fp32", "band": "fp32",
               "stride_b": "i32", "stride_m": "i32", "stride_out_b": "i32", "stride_out_m": "i32",
               "EPS_ZERO": "constexpr", "POWER_ONE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        consts = {"EPS_ZERO": eps_zero, "POWER_ONE": power_one, "BLOCK_M": MS_M, "BLOCK_N": MS_N}
        yield f"masked_scale[{dtype},eps_zero={eps_zero},power_one={power_one}]", _masked_scale_kernel, sig, consts, not power_one
    for wl, wr, mom in itertools.product([False, True], repeat=3):
        sig = {"gt_ptr": "*fp32", "mt_ptr": "*fp32", "wl_ptr": "*fp32", "wr_ptr": "*fp32", "row_part_ptr": "*fp32",
               "col_part_ptr": "*fp32", "m": "i32", "n": "i32", "weight": "fp32", "tiles_m": "i32", "tiles_n": "i32",
               "WL_VECTOR": "constexpr", "WR_VECTOR": "constexpr", "UPDATE_MOMENTUM": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        consts = {"WL_VECTOR": wl, "WR_VECTOR": wr, "UPDATE_MOMENTUM": mom, "BLOCK_M": RS_M, "BLOCK_N": RS_N}
        yield f"rotated_stats[wl_vector={wl},wr_vector={wr},momentum={mom}]", _rotated_stats_kernel, sig, consts, False
    from triton_kernels.top_set import MAX_BLOCK_M, _top_set_kernel

    for m, n in ((48, 64), (768, 1024), (1024, 768), (3072, 768)):  # GPT-2 small's, at 1/16 and full size
        block_m = min(triton.next_power_of_2(m), MAX_BLOCK_M)
        sig = {"a_ptr": "*fp32", "b_asc_ptr": "*fp32", "rank_ptr": "*i64", "values_ptr": "*fp32",
               "m": "constexpr", "n": "constexpr", "BLOCK_M": "constexpr", "LOG_N": "constexpr"}
        consts = {"m": m, "n": n, "BLOCK_M": block_m, "LOG_N": int(n).bit_length()}
        yield f"top_set[{m}x{n}]", _top_set_kernel, sig, consts, False


def main(capability: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, kernel, sig, consts, uses_sqrt in specialisations():
        names = list(sig)
        src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32))
        ptx = compiled.asm["ptx"]
        print(json.dumps({
            "name": name, "cubin_bytes": len(compiled.asm["cubin"]),
            "approximate": [a for a in APPROXIMATE if a in ptx], "uses_sqrt": uses_sqrt,
            "sqrt_rn": "sqrt.rn.f32" in ptx, "wide_block_index": block_index_widened(compiled.asm["ttir"]),
        }), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
