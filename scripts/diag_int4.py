"""Diagnostic: where does the int4 g128 decode kernel lose time? (H200; not part of the suite).

Self-contained variants of the W4A16 decode loop, [16, K] x [N, K/2] bytes, group 128:
  split  : low/high nibbles as two dots against x's even/odd columns (strided loads)
  inter  : nibbles interleaved in registers (stack + reshape), one K=unit dot
  noscale: like inter without the per-group scale multiply (lower bound)
  prescale: scale folded into the bf16 weights before the dot (inexact; what Marlin-style kernels do)
  swap   : acc[n, m] (weights the left operand) vs acc[m, n]
"""
import functools
import numpy as np
import jax, jax.numpy as jnp
from jaxquant.bench.harness import timeit  # PERF.md's method
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxquant.pallas.weight_only import _int4_ptx


def kern(x_ref, w_ref, s_ref, o_ref, *, bn, bk, unit, steps, mode, swap, asm):
    uw = unit // 2

    def deq(wb):
        if asm:
            return _int4_ptx(wb, None, symmetric=True, dt=jnp.bfloat16)
        lo = jnp.right_shift(jnp.left_shift(wb, jnp.int8(4)), jnp.int8(4))
        hi = jnp.right_shift(wb, jnp.int8(4))
        return [lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16)]

    def dot(w, xt):
        if swap:
            return jax.lax.dot_general(w, xt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return jax.lax.dot_general(xt, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def body(t, acc):
        for u in range(bk // unit):
            k0 = t * bk + u * unit
            wb = w_ref[:, pl.ds(k0 // 2, uw)]
            lo, hi = deq(wb)
            s = s_ref[:, pl.ds(k0 // 128, 1)]  # [bn, 1]
            if mode == "prescale":
                sb = s.astype(jnp.bfloat16)
                w = jnp.reshape(jnp.stack([lo * sb, hi * sb], -1), (bn, unit))
                part = dot(w, x_ref[:, pl.ds(k0, unit)])
            elif mode == "split":
                part = dot(lo, x_ref[:, pl.ds(k0, uw, stride=2)]) + dot(hi, x_ref[:, pl.ds(k0 + 1, uw, stride=2)])
            else:
                w = jnp.reshape(jnp.stack([lo, hi], -1), (bn, unit))
                part = dot(w, x_ref[:, pl.ds(k0, unit)])
            if mode in ("split", "inter"):
                part = part * (s if swap else jnp.reshape(s, (1, bn)))
            acc = acc + part
        return acc

    shape = (bn, 16) if swap else (16, bn)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
    o_ref[...] = (acc.T if swap else acc).astype(o_ref.dtype)


def make(n, k, bn, bk, mode, swap, asm, warps, stages, split):
    unit = 128 if mode != "prescale" else min(bk, 512)
    unit = min(unit, bk)
    ks = k // split
    steps = ks // bk
    f = pl.pallas_call(
        functools.partial(kern, bn=bn, bk=bk, unit=unit if mode == "prescale" else 128, steps=steps, mode=mode,
                          swap=swap, asm=asm),
        out_shape=jax.ShapeDtypeStruct((split, 16, n), jnp.float32), grid=(n // bn, split),
        in_specs=[pl.BlockSpec((16, ks), lambda i, s: (0, s)), pl.BlockSpec((bn, ks // 2), lambda i, s: (i, s)),
                  pl.BlockSpec((bn, ks // 128), lambda i, s: (i, s))],
        out_specs=pl.BlockSpec((None, 16, bn), lambda i, s: (s, 0, i)),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages), name="diag_int4")
    if split == 1:
        return jax.jit(lambda x, w, s: f(x, w, s)[0].astype(jnp.bfloat16))
    return jax.jit(lambda x, w, s: jnp.sum(f(x, w, s), 0).astype(jnp.bfloat16))


def main():
    n, k = 8192, 8192
    sets = [(jax.random.normal(jax.random.PRNGKey(i), (16, k), jnp.bfloat16),
             jax.random.randint(jax.random.PRNGKey(i), (n, k // 2), -128, 127, jnp.int8),
             jax.random.uniform(jax.random.PRNGKey(i), (n, k // 128), jnp.float32)) for i in range(6)]
    wb = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.bfloat16) for i in range(2)]
    tb = timeit(jax.jit(lambda x, w: x @ w.T), [(sets[i][0], wb[i]) for i in range(2)])
    print(f"bf16 16x{n}x{k}: {tb*1e6:.1f} us", flush=True)
    ref = None
    for mode, swap, asm, bn, bk, warps, stages, split in (
            ("split", True, True, 64, 512, 4, 4, 2), ("split", True, True, 32, 512, 4, 4, 1),
            ("inter", True, True, 64, 512, 4, 4, 2), ("inter", True, True, 32, 512, 4, 4, 1),
            ("inter", False, True, 64, 512, 4, 4, 2), ("inter", False, True, 32, 512, 4, 4, 1),
            ("inter", True, False, 64, 512, 4, 4, 2), ("noscale", True, True, 64, 512, 4, 4, 2),
            ("noscale", True, True, 32, 512, 4, 4, 1), ("prescale", True, True, 64, 512, 4, 4, 2),
            ("prescale", True, True, 32, 512, 4, 4, 1), ("prescale", False, True, 32, 512, 4, 4, 1),
            ("inter", True, True, 32, 256, 4, 4, 1), ("inter", True, True, 16, 512, 4, 4, 1),
            ("inter", True, True, 64, 256, 4, 3, 1), ("inter", True, True, 128, 256, 4, 3, 1),
            ("inter", True, True, 32, 1024, 4, 3, 1), ("inter", True, True, 64, 512, 8, 3, 1)):
        try:
            f = make(n, k, bn, bk, mode, swap, asm, warps, stages, split)
            t = timeit(f, sets)
            y = np.asarray(f(*sets[0]).astype(jnp.float32))
            if ref is None:
                ref = y
            err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
            print(f"{mode:9s} swap={swap:d} asm={asm:d} bn{bn} bk{bk} w{warps} st{stages} s{split}: {t*1e6:7.1f} us "
                  f"x{tb/t:.2f} bf16  {n*k/2/t/1e9:5.0f} GB/s  relerr {err:.1e}", flush=True)
        except Exception as e:
            print(f"{mode} swap={swap} asm={asm} bn{bn} bk{bk}: ERROR {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
