"""Diagnostic: the Mosaic GPU W8A8 GEMM (``jaxquant.pallas.int8_matmul_mgpu``) on a Hopper GPU.

1. Bit-exactness against the exact reference (int64 accumulator, float32 epilogue) and against
   the Triton GEMM, for several shapes and output dtypes.
2. Timing at prefill shapes: the Triton GEMM, Mosaic GPU tiles, and XLA's int8 dot alone
   (``lax.dot_general(int8, int8) -> int32``, no epilogue), all on the same int8 codes.
Writes OUT/mgpu.json; prints one line per shape. Usage: python3 scripts/diag_mgpu.py OUT [check|time|all|mid]
"""
import json, os, sys, traceback

import numpy as np
import jax, jax.numpy as jnp

from jaxquant.bench.harness import timeit
from jaxquant.pallas import int8_matmul as MM
from jaxquant.pallas import int8_matmul_mgpu as MG
from jaxquant.pallas.int8_matmul_mgpu import Config as CG


def operands(m, n, k, seed):
    r = np.random.default_rng(seed)
    a = jnp.asarray(r.integers(-128, 128, (m, k), dtype=np.int8))
    w = jnp.asarray(r.integers(-128, 128, (n, k), dtype=np.int8))
    sa = jnp.asarray((r.random((m, 1)) * 1e-2 + 1e-4).astype(np.float32))
    sw = jnp.asarray((r.random(n) * 1e-2 + 1e-4).astype(np.float32))
    return a, w, sa, sw


def reference(a, w, sa, sw, dt):
    acc = np.asarray(a, np.int64) @ np.asarray(w, np.int64).T
    assert np.abs(acc).max() < 2**31
    y = (acc.astype(np.int32).astype(np.float32) * np.asarray(sa)) * np.asarray(sw)[None, :]
    return np.asarray(jnp.asarray(y).astype(dt))


def check(rows):
    cases = [(256, 512, 512), (384, 768, 1024), (1024, 2048, 4096), (2048, 4096, 14336)]
    cfgs = [None, CG(stages=3, epi_n=64), CG(tile_k=64, stages=6)]
    for i, (m, n, k) in enumerate(cases):
        a, w, sa, sw = operands(m, n, k, i)
        for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
            want = reference(a, w, sa, sw, dt)
            tri = np.asarray(jax.jit(lambda *z: MM.int8_matmul(z[0], z[1], a_scale=z[2], w_scale=z[3], out_dtype=dt))(a, w, sa, sw))
            for c in cfgs:
                try:
                    got = np.asarray(jax.jit(lambda *z, c=c: MG.int8_matmul_mgpu(*z, out_dtype=dt, config=c))(a, w, sa, sw))
                    bad = int(np.sum(got.view(np.uint8 if got.itemsize == 1 else f"u{got.itemsize}") !=
                                     want.view(f"u{want.itemsize}")))
                    res = dict(kind="check", shape=[m, n, k], dtype=jnp.dtype(dt).name, config=str(c), mismatches=bad,
                               triton_mismatches=int(np.sum(tri != want)))
                except Exception as e:
                    res = dict(kind="check", shape=[m, n, k], dtype=jnp.dtype(dt).name, config=str(c),
                               error=traceback.format_exc()[-1500:])
                rows.append(res)
                print(res if "error" not in res else f"ERR {m}x{n}x{k} {c}\n{res['error']}", flush=True)


TIMING_SHAPES = [(2048, 4096, 14336), (8192, 4096, 14336), (2048, 8192, 8192), (8192, 8192, 8192),
                 (8192, 4096, 4096), (2048, 14336, 4096), (8192, 14336, 4096)]
TILES = [None, CG(stages=3, epi_n=64), CG(grid_tile_width=4), CG(grid_tile_width=16), CG(minor_n=False),
         CG(tile_k=64, stages=6), CG(tile_n=64, stages=5, epi_n=64)]


# mid M: where the CTA tiles number about one wave or less (use_mgpu's threshold)
MID_SHAPES = [(512, 8192, 8192), (512, 4096, 14336), (512, 4096, 4096), (1024, 4096, 4096), (1024, 8192, 8192),
              (256, 14336, 4096), (256, 8192, 8192)]


def time_all(rows, shapes=TIMING_SHAPES, tiles=TILES):
    for (m, n, k) in shapes:
        a, w, sa, sw = operands(m, n, k, 0)
        ops = 2.0 * m * n * k
        tri = jax.jit(lambda a, w, sa, sw: MM.int8_matmul(a, w, a_scale=sa, w_scale=sw, out_dtype=jnp.bfloat16))
        xla = jax.jit(lambda a, w: jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32))
        t_tri = timeit(tri, [(a, w, sa, sw)])
        t_xla = timeit(xla, [(a, w)])
        line = [f"triton {ops / t_tri / 1e12:.0f}", f"xla-dot {ops / t_xla / 1e12:.0f}"]
        rows.append(dict(kind="time", shape=[m, n, k], op="triton", us=t_tri * 1e6, tops=ops / t_tri / 1e12))
        rows.append(dict(kind="time", shape=[m, n, k], op="xla_int8_dot", us=t_xla * 1e6, tops=ops / t_xla / 1e12))
        for c in tiles:
            try:
                f = jax.jit(lambda a, w, sa, sw, c=c: MG.int8_matmul_mgpu(a, w, sa, sw, out_dtype=jnp.bfloat16, config=c))
                t = timeit(f, [(a, w, sa, sw)])
                rows.append(dict(kind="time", shape=[m, n, k], op="mgpu", config=str(c), us=t * 1e6, tops=ops / t / 1e12))
                line.append(f"{'auto' if c is None else c.__repr__()[7:]} {ops / t / 1e12:.0f}")
            except Exception as e:
                rows.append(dict(kind="time", shape=[m, n, k], op="mgpu", config=str(c), error=str(e)[:400]))
                line.append(f"{c} ERR {str(e)[:80]}")
        print(f"{m}x{n}x{k} TOP/s: " + " | ".join(line), flush=True)


if __name__ == "__main__":
    out = sys.argv[1]
    what = sys.argv[2] if len(sys.argv) > 2 else "all"
    os.makedirs(out, exist_ok=True)
    rows = []
    try:
        if what in ("check", "all"):
            check(rows)
        if what in ("time", "all"):
            time_all(rows)
        if what == "mid":
            time_all(rows, MID_SHAPES, [None, CG(tile_n=64)])
    finally:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                  open(os.path.join(out, "mgpu.json"), "w"), indent=1)
