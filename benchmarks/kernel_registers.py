"""Registers and spills of the fused kernels (implicit_hooks/kernels.py), without a GPU.

Compiles each kernel for sm_90 (the H200) with Triton's own compiler and ``ptxas -v`` from the Triton
wheel (where that ptxas is older than the PTX, as in Triton 3.9: the cubin Triton built, its registers and
stack read by ``cuobjdump``), its pointers 16-byte aligned as at a launch, and prints registers per thread,
bytes spilled, the instructions of its SASS (static, ``nvdisasm``: loops once; the far tiles' loop went
319 → 189 when they stopped multiplying each entry by its factors, a change that shows here before any GPU
time), the fast exponentials, the vectorised global stores and the shared-memory stores in the PTX (per
thread, loops not unrolled; launches of aligned reads, ``ALIGNED`` as ``kernels.TUNING["aligned_run"]``
sets it), for float32 output and, for dense reads, bfloat16 (where a store wider than the entries a thread
holds makes the compiler reshuffle each tile through shared memory first: more shared stores), and the
values a loop stages through shared memory though they are defined before it (:func:`staged_in_loops`,
from the TTGIR: a store and a barrier every iteration where once would do). A spill or
255 registers is what made the near tiles 10× slower than their exponentials allow before
(``benchmarks/results/gpu.md``); check here before spending GPU time.

    python benchmarks/kernel_registers.py          # any machine with triton installed (Linux)
    python benchmarks/kernel_registers.py --only "by head" --loops    # and each loop's barriers, loads

Channel sums are compiled with their row and column weights (a weighted sum) and without (``None``: a
plain mean, which loads and multiplies none). Kernels that ``kernels.TUNING["maxnreg"]`` caps are also shown
as shipped (the cap applies to dense launches; Mamba-2's kernels run at 8 warps, where they stay under it).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from implicit_hooks import kernels

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
NVDISASM = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
CUOBJDUMP = os.path.join(os.path.dirname(PTXAS), "cuobjdump")
FLOAT64 = {"sb_ptr", "sref_ptr", "key_ptr", "logz_ptr", "w_ptr", "u_ptr", "cum_ptr"}

#: (name, kernel, constexprs): Mamba-1 (N = 16, K = 4), Mamba-2 (N = 128, scalar rate), RG-LRU, RWKV-4
CASES = [
    ("far, Mamba-1", "far", kernels._far_kernel,
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=False, K=4, KP=4, SQ=16, STRIPS=False, REDUCE=False,
          TRANSFORM=0, ALIGNED=16, CB=16)),
    ("far, split TF32", "far", kernels._far_kernel,
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=True, K=4, KP=4, SQ=16, STRIPS=False, REDUCE=False,
          TRANSFORM=0, ALIGNED=16, CB=16)),
    ("far and strips", "far", kernels._far_kernel,  # its far and zero tiles streamed (TUNING["evict"])
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=True, K=4, KP=4, SQ=16, STRIPS=True, REDUCE=False,
          TRANSFORM=0, ALIGNED=16, CB=16, EVICT=1, PREFETCH=True)),
    ("far and strips, ahead", "far", kernels._far_kernel,  # as bfloat16 reads run it (TUNING["far_ahead"])
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=True, K=4, KP=4, SQ=16, STRIPS=True, REDUCE=False,
          TRANSFORM=0, ALIGNED=16, CB=16, AHEAD=True, EVICT=1, PREFETCH=True)),
    ("far and strips, short", "far_short", kernels._far_kernel,  # short bf16 reads (TUNING["short_tiles"])
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=True, K=4, KP=4, SQ=16, STRIPS=True, REDUCE=False,
          TRANSFORM=0, ALIGNED=16, CB=16, AHEAD=True, EVICT=1, UNROLL=2, PREFETCH=True)),
    ("far, Mamba-2", "far_wide", kernels._far_kernel,
     dict(N=128, NP=128, Q=64, FAR_DOT=True, SPLIT=False, K=4, KP=4, SQ=16, STRIPS=False, REDUCE=False,
          TRANSFORM=0, ALIGNED=16, CB=16)),
    ("far, reduce", "far_reduce", kernels._far_kernel,
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=False, K=4, KP=4, SQ=16, STRIPS=False, REDUCE=True,
          TRANSFORM=1, ALIGNED=16, CB=16)),
    ("far, signed sums", "far_reduce", kernels._far_kernel,
     dict(N=16, NP=16, Q=64, FAR_DOT=True, SPLIT=True, K=4, KP=4, SQ=16, STRIPS=False, REDUCE=True,
          TRANSFORM=0, ALIGNED=16, CB=kernels.TUNING["far_sum_depth"] // 16)),
    ("far, RG-LRU sums", "far_outer_reduce", kernels._far_kernel,
     dict(N=1, NP=1, Q=64, FAR_DOT=False, SPLIT=True, K=4, KP=4, SQ=16, STRIPS=False, REDUCE=True,
          TRANSFORM=1, ALIGNED=16, CB=kernels.TUNING["rank_one_channels"])),
    ("near, RG-LRU sums", "near_reduce", kernels._near_kernel,
     dict(N=1, K=4, KP=4, Q=64, SCALAR=False, REDUCE=True, TRANSFORM=1, ALIGNED=16)),
    ("near sums added up", "near_sum_reduce", kernels._near_sum_kernel, dict(Q=64, ALIGNED=16)),
    ("near, Mamba-1", "near", kernels._near_kernel,
     dict(N=16, K=4, KP=4, Q=64, SCALAR=False, REDUCE=False, TRANSFORM=0, ALIGNED=16)),
    ("near, Mamba-2", "near_scalar", kernels._near_kernel,
     dict(N=128, K=4, KP=4, Q=64, SCALAR=True, REDUCE=False, TRANSFORM=0, ALIGNED=16)),
    ("near, RG-LRU", "near", kernels._near_kernel,
     dict(N=1, K=4, KP=4, Q=64, SCALAR=False, REDUCE=False, TRANSFORM=0, ALIGNED=16)),
    ("WKV, RWKV-4", "wkv", kernels._wkv_kernel,
     dict(Q=64, REDUCE=False, TRANSFORM=0, ALIGNED=16, CB=0, SPLIT=True, EVICT=1)),
    ("WKV, sums", "wkv_reduce", kernels._wkv_kernel,
     dict(Q=64, REDUCE=True, TRANSFORM=1, ALIGNED=16, CB=0, SPLIT=True)),
    ("WKV, far products", "wkv_reduce", kernels._wkv_kernel,
     dict(Q=64, REDUCE=True, TRANSFORM=1, ALIGNED=16, CB=16, SPLIT=True)),
    ("strips, reduce", "strip_reduce", kernels._strip_kernel,
     dict(N=16, NP=16, K=4, KP=4, Q=64, SQ=16, SPLIT=True, TRANSFORM=1, ALIGNED=16)),
    ("by head, Mamba-2", "head", kernels._head_kernel,
     dict(N=128, Q=64, H=16, NC=16, SPLIT=True, ALIGNED=4, EVICT=1, LOAD_EVICT=2)),
    ("by head, sums", "head_reduce", kernels._head_reduce_kernel,
     dict(N=128, Q=64, H=16, NC=16, SPLIT=True, TRANSFORM=1, ALIGNED=4, GROUPED=False, CB=0)),
    ("by head, signed sums", "head_reduce", kernels._head_reduce_kernel,
     dict(N=128, Q=64, H=16, NC=16, SPLIT=True, TRANSFORM=0, ALIGNED=4, GROUPED=False, CB=32)),
    ("preparation, Mamba-1", "prep", kernels._prep_kernel,
     dict(N=16, NP=16, K=4, KP=4, Q=64, P=64, SQ=16, ROWS=False)),
]  # fmt: skip
#: pointers of a kernel whose names mean another type elsewhere (the preparation's ``u``: the input weight)
TYPES = {kernels._prep_kernel: {"S_ptr": "*fp64", "u_ptr": "*fp32"}}


#: what :func:`loops` counts in each loop's SASS (an opcode's prefix): barriers, global loads and stores,
#: shared-memory traffic, exponentials
LOOP_OPCODES = {"BAR": "BAR", "LDG": "LDG", "STG": "STG", "STS": "STS", "LDS": "LDS", "STSM": "STSM",
                "ex2": "MUFU.EX2"}  # fmt: skip


def loops(sass: str) -> list[str]:
    """One line per loop of the SASS (a branch back to a label): its instructions and what
    :data:`LOOP_OPCODES` counts in it, an inner loop's instructions counted in its outer loop too. A barrier
    or a load in a kernel's innermost loop is paid every iteration: Mamba-2's channel loop showed 10 barriers
    a channel and the far tiles' loop 14 a tile (run QQ, ``benchmarks/results/gpu.md``)."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"\s*\.L_x_\d+:", line)}
    found = []
    for end, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        start = labels.get(target.group(1)) if target else None
        if start is None or start >= end:
            continue
        body = [x.split(";")[0] for x in lines[start : end + 1] if re.search(r"/\*[0-9a-f]{4}\*/", x)]
        if len(body) < 2:
            continue  # the end-of-kernel self-branch
        opcodes = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", x).split(" ")[0] for x in body]
        counts = {k: sum(op.startswith(prefix) for op in opcodes) for k, prefix in LOOP_OPCODES.items()}
        counts["STS"] -= counts["STSM"]  # STS counted STSM too
        found.append(
            f"loop at line {start}: {len(body)} SASS, " + ", ".join(f"{v} {k}" for k, v in counts.items())
        )  # noqa: E501
    return found


def staged_in_loops(ttgir: str) -> list[str]:
    """The values a loop of the TTGIR stages through shared memory (``ttg.local_alloc``, a tensor-core
    operand or a layout change) though they are defined before the loop: each costs a store, a barrier and
    loads again every iteration where once would do. The far tiles of Mamba-1's dense reads staged their
    row factors so, from inside ``if far`` (8 KB a tile), until their loop lost the branch
    (:func:`kernels._far_run`: 7.7–11 % less far-kernel time stored in bfloat16, run AAA)."""
    lines = ttgir.splitlines()
    defined, loops, found = {}, [], []
    for number, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if loops and indent <= loops[-1][0] and text.startswith("}") and "do {" not in text:
            loops.pop()  # a loop's last region closes (a while's first closes with "} do {")
        name = re.match(r"(%[\w.]+)(?::\d+)? = ", text)
        if name:
            defined[name.group(1)] = number
        if re.search(r"(= |^)scf\.(while|for) ", text):
            loops.append((indent, number))
        staged = re.search(r"ttg\.local_alloc (%[\w.]+)", text)
        if staged and loops and defined.get(staged.group(1), -1) < loops[-1][1]:
            found.append(f"{staged.group(1)} (defined at line {defined.get(staged.group(1))}, "
                         f"staged at {number} in the loop from {loops[-1][1]})")  # fmt: skip
    return found


def report(kernel, constants: dict, warps: int, maxnreg: int | None = None, output: str = "*fp32",
           with_loops: bool = False) -> str:  # fmt: skip
    signature = {}
    parameters = inspect.signature(kernel.fn).parameters
    # constexprs left out take their defaults (AHEAD, EVICT), as at a launch
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    constants = {**defaults, **constants}
    for name in parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            integer = name.startswith(("seg", "chan", "start"))
            signature[name] = "*i32" if integer else "*fp64" if name in FLOAT64 else "*fp32"
            signature[name] = TYPES.get(kernel, {}).get(name, signature[name])
        else:
            signature[name] = "fp32" if name == "max_growth" else "i32"
    if "out_ptr" in signature:
        signature["out_ptr"] = output
    # pointers 16-byte aligned, as Triton specialises them at a launch on torch's allocations
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if name.endswith("_ptr") and kind != "constexpr"  # (Triton 3.9 refuses attributes on constexprs)
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    options = {"num_warps": warps, **kernels.FP_FUSION}  # as the kernels are launched
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        command = [PTXAS, "-arch=sm_90a", "-v", path, "-o", cubin]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            registers = re.search(r"Used (\d+) registers", done.stderr).group(1)
            spilled = re.search(r"(\d+) bytes spill stores", done.stderr).group(1)
        else:  # a Triton whose PTX is newer than the ptxas beside it (3.9): the cubin it built itself
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True).stdout
            registers = re.search(r"REG:(\d+)", usage).group(1)
            spilled = re.search(r"STACK:(\d+)", usage).group(1)  # the stack frame: what spills take
        sass = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True).stdout
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]+\*/", sass, flags=re.M))
    exps = ptx.count("ex2.approx")
    wide = len(re.findall(r"st\.global(?:\.L[12]::\w+)*\.v[24]", ptx))  # (with eviction hints too)
    stores = len(re.findall(r"st\.global", ptx))
    shared = ptx.count("st.shared")  # tiles reshuffled between layouts (and tl.dot's operands)
    invariant = len(staged_in_loops(compiled.asm["ttgir"]))
    summary = (
        f"{registers:>4} registers, {spilled:>6} bytes spilled, {instructions:>5} SASS, {exps:>3} ex2, "
        f"{wide:>2} of {stores:>2} global stores vectorised, {shared:>3} shared stores in the PTX, "
        f"{invariant} loop-invariant values staged in loops"
    )
    return summary + "".join(f"\n{'':24s}{loop}" for loop in loops(sass)) if with_loops else summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="the cases whose name contains this, e.g. 'by head'")
    parser.add_argument("--loops", action="store_true", help="also each loop's SASS: barriers, loads, stores")
    args = parser.parse_args()
    for name, key, kernel, constants in CASES:
        if args.only and args.only not in name:
            continue
        cap = kernels.TUNING["maxnreg"].get(key)  # as shipped: capped by TUNING["maxnreg"]
        out = "*bf16" if key == "far_short" else "*fp32"  # short reads are those stored in 16 bits
        for warps in (2, 4) if key == "prep" else (4, 8):  # the preparation launches 2 (TUNING)
            plain = report(kernel, constants, warps, output=out, with_loops=args.loops)
            print(f"{name:20s} {warps} warps: {plain}", flush=True)
            if cap is not None:
                capped = report(kernel, constants, warps, cap, output=out, with_loops=args.loops)
                print(f"{'':20s} capped at {cap}: {capped}", flush=True)
        # a plain sum weighs nothing (weights None: its own variant), but Mamba-2's products read ones
        weighs = "rw_ptr" in inspect.signature(kernel.fn).parameters
        products = key == "head_reduce" and constants.get("CB", 0) > 0
        if weighs and constants.get("REDUCE", key.endswith("reduce")) and not products:
            unweighted = {**constants, "rw_ptr": None, "cw_ptr": None}
            for warps in (4, 8):
                plain = report(kernel, unweighted, warps, with_loops=args.loops)
                print(f"{'':20s} unweighted, {warps} warps: {plain}", flush=True)
        dense = not constants.get("REDUCE", key.endswith("reduce"))
        if key not in ("prep", "far_short") and dense:  # dense reads in bfloat16
            narrow = report(kernel, constants, 4, output="*bf16", with_loops=args.loops)
            print(f"{'':20s} bfloat16, 4 warps: {narrow}", flush=True)


if __name__ == "__main__":
    main()
