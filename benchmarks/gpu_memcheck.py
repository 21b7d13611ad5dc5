#!/usr/bin/env python3
"""The target of the smoke check's memcheck (benchmarks/gpu_smoke.py): one forward (training and
inference) and one backward of every dtype, k and direction on CuPy arrays, every option on, at
sizes whose column count is not a multiple of the block size. Run under

    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/gpu_memcheck.py

CuPy's memory pool is turned off first: a pool hands out pieces of larger allocations, where a read
or write past an array's end would land in memory the tool counts as allocated. Prints
``memcheck target: done, N launches`` at the end."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cupy  # noqa: E402

from gpu_smoke import DTYPES, problem, to_device  # noqa: E402
from sru_cupy.launch import recurrence_backward, recurrence_forward  # noqa: E402


def main():
    cupy.cuda.set_allocator(None)
    launches = 0
    for dtype in DTYPES:
        for k in (3, 4):
            for bidirectional in (False, True):
                args, options, grad_h, grad_c_last = to_device(problem(dtype, k, bidirectional,
                                                                       L=5, B=3, d=7))
                _, c, _ = recurrence_forward(*args, **options)
                recurrence_forward(*args, **options, store_c=False)
                recurrence_backward(grad_h, grad_c_last, *args, c, **options,
                                    reduce_params=False)
                launches += 3
    cupy.cuda.Device().synchronize()
    print(f"memcheck target: done, {launches} launches", flush=True)


if __name__ == "__main__":
    main()
