"""`np.argsort(x)` (kind "quicksort") exactly as NumPy 1.23 returns it, on any machine and NumPy version.

GenEval's `evaluate_images.py` orders a class's boxes by `np.argsort(scores)[::-1]`, and its environment.yml pins
numpy 1.23.1. That argsort is not stable: the order of tied scores is whatever its introsort leaves, and NumPy
since 1.25 sends float arrays to SIMD sorts (x86-simd-sort, Highway) whose tie order differs again and depends on the
CPU. This transcribes 1.23's `aquicksort_` / `aheapsort_` (numpy/core/src/npysort/quicksort.cpp, heapsort.cpp at
v1.23.1): median-of-three quicksort on runs of more than 16 elements (SMALL_QUICKSORT 15), the larger part pushed
on a stack, insertion sort below that (so up to 16 boxes keep tied ones in input order), heapsort past a depth of
2 * floor(log2(n)); `less` puts NaN last. Recent NumPy runs the same generic code when its SIMD dispatch is switched
off (NPY_DISABLE_CPU_FEATURES), which the tests use.
"""

from __future__ import annotations

import math
from typing import Sequence

SMALL_QUICKSORT = 15


def _less(a: float, b: float) -> bool:
    return a < b or (b != b and a == a)


def _aheapsort(v: Sequence[float], tosort: list[int], start: int, n: int):
    """aheapsort_ on tosort[start:start + n] (1-based heap indexing as the C code)."""
    def get(i):
        return tosort[start + i - 1]

    def put(i, value):
        tosort[start + i - 1] = value

    def sift_down(tmp, i, n):  # the loop both phases of aheapsort_ run: tmp sinks from slot i of a heap of n
        j = i << 1
        while j <= n:
            if j < n and _less(v[get(j)], v[get(j + 1)]):
                j += 1
            if _less(v[tmp], v[get(j)]):
                put(i, get(j))
                i, j = j, j + j
            else:
                break
        put(i, tmp)

    for l in range(n >> 1, 0, -1):
        sift_down(get(l), l, n)
    while n > 1:
        tmp = get(n)
        put(n, get(1))
        n -= 1
        sift_down(tmp, 1, n)


def argsort(values: Sequence[float]) -> list[int]:
    """The permutation NumPy 1.23's `np.argsort(values)` returns (values as the array's dtype would hold them: round
    float32 scores through np.float32 first)."""
    v = [float(x) for x in values]
    num = len(v)
    tosort = list(range(num))
    if num < 2:
        return tosort
    pl, pr = 0, num - 1
    stack: list[int] = []
    depths: list[int] = []
    cdepth = int(math.floor(math.log2(num))) * 2  # npy_get_msb(num) * 2
    while True:
        if cdepth < 0:
            _aheapsort(v, tosort, pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if _less(v[tosort[pm]], v[tosort[pl]]):
                    tosort[pm], tosort[pl] = tosort[pl], tosort[pm]
                if _less(v[tosort[pr]], v[tosort[pm]]):
                    tosort[pr], tosort[pm] = tosort[pm], tosort[pr]
                if _less(v[tosort[pm]], v[tosort[pl]]):
                    tosort[pm], tosort[pl] = tosort[pl], tosort[pm]
                vp = v[tosort[pm]]
                pi, pj = pl, pr - 1
                tosort[pm], tosort[pj] = tosort[pj], tosort[pm]
                while True:
                    pi += 1
                    while _less(v[tosort[pi]], vp):
                        pi += 1
                    pj -= 1
                    while _less(vp, v[tosort[pj]]):
                        pj -= 1
                    if pi >= pj:
                        break
                    tosort[pi], tosort[pj] = tosort[pj], tosort[pi]
                pk = pr - 1
                tosort[pi], tosort[pk] = tosort[pk], tosort[pi]
                if pi - pl < pr - pi:  # push the larger part
                    stack += [pi + 1, pr]
                    pr = pi - 1
                else:
                    stack += [pl, pi - 1]
                    pl = pi + 1
                cdepth -= 1
                depths.append(cdepth)
            for pi in range(pl + 1, pr + 1):  # insertion sort
                vi = tosort[pi]
                vp = v[vi]
                pj = pi
                while pj > pl and _less(vp, v[tosort[pj - 1]]):
                    tosort[pj] = tosort[pj - 1]
                    pj -= 1
                tosort[pj] = vi
        if not stack:
            break
        pr = stack.pop()
        pl = stack.pop()
        cdepth = depths.pop()
    return tosort
