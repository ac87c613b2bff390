#!/bin/bash
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
timeout 200 python -m pytest -q tests/test_kernels.py -k "cuda_kernel_against or near_strips and cuda" > $OUT/cuda_kernels_final_pytest.log 2>&1; tail -2 $OUT/cuda_kernels_final_pytest.log
