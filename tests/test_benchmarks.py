"""The benchmark scripts run: each one's ``--smoke`` mode, tiny shapes on the CPU.

The scripts take their figures on the GPU machine, where device time is scarce: a change of the package that
breaks one should show here first. Timings on a CPU mean nothing, so what is checked is what each script
reports about correctness (the exactness of the recorded blocks, matrices compared between two versions),
and that every family and part it promises is there. ``bench_peers.py`` needs TransformerLens, which the
tests do not install (they check that it says so); ``kernel_registers.py`` compiles for sm_90, too slow
here, so only its SASS reader (:func:`kernel_registers.loops`) is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
FAMILIES = {"mamba", "mamba2", "rglru", "rwkv4"}


def launch(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> args`` with the benchmarks and the package importable."""
    path = os.pathsep.join(filter(None, [str(BENCH), str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )


def run(script: str, *args: str, cwd: Path) -> list[dict]:
    """The JSON rows ``benchmarks/<script> args`` prints (it must exit 0)."""
    done = launch(script, *args, cwd=cwd)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_bench_gpu_takes_every_part_of_every_family_and_the_blocks_are_exact(tmp_path):
    rows = run("bench_gpu.py", "--smoke", cwd=tmp_path)  # (writes no results file)
    parts = {(r["family"], r["part"]) for r in rows}
    assert parts >= {(family, part) for family in FAMILIES for part in ("overhead", "assembly", "row")}
    for r in rows:
        if r["part"] == "assembly":
            assert r["output_error"] < 1e-5, r  # A·x + bias against the block's real output
        if r["part"] == "overhead" and r["batch"] == 1:
            assert r["max_output_error"] < 1e-5, r  # every layer of the recorded model
            assert r["pairs"] == 2 and len(r["overhead_paired"]) == 3
            assert len(r["overhead_open_paired"]) == len(r["twin_paired"]) == 3  # in a context kept open
            assert r["left_hooked_modules"] == 0
            assert r["setup_cold_s"] > 0 and r["setup_s"] > 0  # the set-up in a loop and after a forward
        if r["part"] == "row":
            assert r["row_torch_vs_torch_rel"] < 1e-6, r  # a row read alone against the dense matrix's


@pytest.mark.parametrize("dtype", [[], ["--bfloat16"]], ids=["float32", "bfloat16"])
def test_ab_dense_finds_one_version_the_same_bits_as_itself(tmp_path, dtype):
    for label in ("a", "b"):
        rows = run("ab_dense.py", label, str(tmp_path), "--smoke", "--families", "mamba", "rwkv4", *dtype,
                   cwd=tmp_path)  # fmt: skip
        assert {r["family"] for r in rows} == {"mamba", "rwkv4"}
        assert {r["dtype"] for r in rows} == {"bfloat16" if dtype else "float32"}
        assert all(len(r["mean_b2b_s"]) == 3 and r["mean_b2b_s"][0] > 0 for r in rows)
    (result,) = run("ab_dense.py", str(tmp_path), "--compare", "a", "b", cwd=tmp_path)
    matrices = {"mamba16", "mamba80", "rwkv416", "rwkv480"}
    assert set(result) == matrices | {key + "mean" for key in matrices}  # the dense blocks and the means
    assert all(r["same"] and r["rel"] == 0.0 for r in result.values()), result


def test_profile_dense_and_host_issue_split_a_read(tmp_path):
    rows = run("profile_dense.py", "--smoke", cwd=tmp_path)
    assert {r["family"] for r in rows} == FAMILIES
    assert all(r["wall_s"] > 0 and r["top"] for r in rows)
    # Triton's interpreter runs the launches on the CPU: one read of RWKV-4, its one kernel
    (row,) = run("host_issue.py", "--smoke", "--families", "rwkv4", "--reads", "1", cwd=tmp_path)
    assert len(row["launches"]) == 1 and row["whole_us"] > 0 and row["glue_us"] > 0
    # the channel mean of RG-LRU: its preparation, far, near and adding-up kernels
    (row,) = run(
        "host_issue.py", "--smoke", "--families", "rglru", "--reads", "1", "--read", "mean", cwd=tmp_path
    )
    assert row["read"] == "mean" and len(row["launches"]) == 4 and row["glue_us"] > 0


@pytest.mark.skipif(importlib.util.find_spec("transformer_lens") is not None, reason="TransformerLens here")
def test_bench_peers_says_what_it_needs_before_it_starts(tmp_path):
    done = launch("bench_peers.py", "--smoke", cwd=tmp_path)
    assert done.returncode == 2 and "pip install transformer-lens" in done.stderr


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   STS [R3], R2 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
.L_x_1:
        /*0050*/                   STSM.16.M88 [R5], R84 ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
        /*0070*/               @!P1 STG.E desc[UR4][R6.64], R2 ;
        /*0080*/                   MUFU.EX2 R7, R7 ;
        /*0090*/               @P2 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_2:
        /*00b0*/                   BRA `(.L_x_2) ;
"""


def test_kernel_registers_reads_the_loops_of_a_sass_listing():
    sys.path.insert(0, str(BENCH))
    kernel_registers = pytest.importorskip("kernel_registers", reason="needs Triton's compiler")
    inner, outer = kernel_registers.loops(SASS)  # in the order their branches back come
    assert inner.endswith("2 SASS, 0 BAR, 0 LDG, 0 STG, 0 STS, 0 LDS, 1 STSM, 0 ex2")
    # the outer loop holds the inner one; a tensor-core wait (DEPBAR) is no barrier; the self-branch at
    # the end is no loop
    assert outer.endswith("9 SASS, 1 BAR, 1 LDG, 1 STG, 1 STS, 0 LDS, 1 STSM, 1 ex2")


TTGIR = """\
    %u = arith.mulf %c, %e : tensor<64x16xf32, #blocked>
    %r:2 = scf.while (%J = %J0, %v = %v0) : (i32, tensor<64x16xf32, #blocked>) -> (i32, tensor<64x16xf32>) {
      %go = arith.cmpi slt, %J, %end : i32
      scf.condition(%go) %J, %v : i32, tensor<64x16xf32, #blocked>
    } do {
    ^bb0(%J: i32, %v: tensor<64x16xf32, #blocked>):
      %y = arith.mulf %v, %mid : tensor<64x16xf32, #blocked>
      %a = ttg.local_alloc %u : (tensor<64x16xf32, #blocked>) -> !ttg.memdesc<64x16xf32, #shared, #smem>
      %b = ttg.local_alloc %y : (tensor<64x16xf32, #blocked>) -> !ttg.memdesc<64x16xf32, #shared, #smem>
      scf.yield %J, %y : i32, tensor<64x16xf32, #blocked>
    }
    %w = ttg.local_alloc %u : (tensor<64x16xf32, #blocked>) -> !ttg.memdesc<64x16xf32, #shared, #smem>
"""


def test_kernel_registers_finds_loop_invariant_values_staged_in_a_loop():
    sys.path.insert(0, str(BENCH))
    kernel_registers = pytest.importorskip("kernel_registers", reason="needs Triton's compiler")
    # %u, defined before the loop and staged in it; not %y, defined in the loop, nor %u after the loop
    # (a while's first region closes with "} do {", which does not end the loop)
    found = kernel_registers.staged_in_loops(TTGIR)
    assert found == ["%u (defined at line 0, staged at 7 in the loop from 1)"]
