"""Diagnostic: is the weight stream of a Pallas Triton loop pipelined? (H200; not part of the suite).

Times kernels that stream int8 ``[N, Kb]`` bytes in a fori_loop of [BN, BW] tiles:
  sum    : load + int32 row sums (no dot)
  dot    : load -> bf16 -> dot with x [16, BW] (the W8A16 decode core)
  pf<d>  : dot, with the next d tiles loaded ahead and carried in registers (manual prefetch)
and dumps PTX statistics (cp.async / ld.global / mma counts) of one variant.
"""
import functools, os, sys, glob, re
import jax, jax.numpy as jnp
from jaxquant.bench.harness import timeit  # PERF.md's method
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def kern(x_ref, w_ref, o_ref, *, bn, bw, steps, mode, dist):
    def tile(t):
        return w_ref[:, pl.ds(t * bw, bw)]

    if mode == "sum":
        def body(t, acc):
            return acc + jnp.sum(tile(t).astype(jnp.int32), axis=1, keepdims=True)
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, 1), jnp.int32))
        o_ref[...] = jnp.broadcast_to(acc.astype(jnp.float32), (bn, 16)).T
        return

    def use(wt, t, acc):
        xt = x_ref[:, pl.ds(t * bw, bw)]
        return acc + jax.lax.dot_general(wt.astype(jnp.bfloat16), xt, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
    if dist == 0:
        acc = jax.lax.fori_loop(0, steps, lambda t, a: use(tile(t), t, a), jnp.zeros((bn, 16), jnp.float32))
    else:
        pre = tuple(tile(i) for i in range(dist))

        def body(t, c):
            acc, q = c
            nxt = tile(jnp.minimum(t + dist, steps - 1))
            acc = use(q[0], t, acc)
            return acc, q[1:] + (nxt,)
        acc, _ = jax.lax.fori_loop(0, steps, body, (jnp.zeros((bn, 16), jnp.float32), pre))
    o_ref[...] = acc.T


def make(n, kb, bn, bw, mode, dist, warps, stages):
    steps = kb // bw
    f = pl.pallas_call(
        functools.partial(kern, bn=bn, bw=bw, steps=steps, mode=mode, dist=dist),
        out_shape=jax.ShapeDtypeStruct((16, n), jnp.float32), grid=(n // bn,),
        in_specs=[pl.BlockSpec((16, kb), lambda i: (0, 0)), pl.BlockSpec((bn, kb), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((16, bn), lambda i: (0, i)),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages), name=f"diag_{mode}{dist}")
    return jax.jit(f)


def main():
    n, kb = 8192, 8192  # 64 MiB int8: W8A16 8192x8192 (or W4 8192x16384)
    sets = [(jax.random.normal(jax.random.PRNGKey(i), (16, kb), jnp.bfloat16),
             jax.random.randint(jax.random.PRNGKey(i), (n, kb), -128, 127, jnp.int8)) for i in range(4)]
    copy = jax.jit(lambda w: -w)
    tc = timeit(copy, [(s[1],) for s in sets])
    print(f"copy int8 64MiB: {2*n*kb/tc/1e9:.0f} GB/s")
    bf = jax.jit(lambda x, w: x @ w.T)
    wb = [jax.random.normal(jax.random.PRNGKey(i), (n, kb), jnp.bfloat16) for i in range(2)]
    tb = timeit(bf, [(sets[i][0], wb[i]) for i in range(2)])
    print(f"bf16 16x{n}x{kb}: {tb*1e6:.1f} us ({2*n*kb/tb/1e9:.0f} GB/s)")
    rows = []
    for mode, dist in (("sum", 0), ("dot", 0), ("dot", 1), ("dot", 2)):
        for bn, bw, warps, stages in ((16, 256, 4, 1), (16, 256, 4, 4), (32, 256, 4, 1), (32, 256, 4, 4),
                                      (32, 512, 4, 3), (64, 256, 4, 4), (64, 128, 4, 4), (16, 512, 4, 3),
                                      (64, 512, 8, 3), (128, 128, 4, 3)):
            if dist and stages != 1 and (bn, bw) not in ((32, 256), (64, 256), (16, 256)):
                continue
            try:
                f = make(n, kb, bn, bw, mode, dist, warps, stages)
                t = timeit(f, sets)
                rows.append((mode, dist, bn, bw, warps, stages, t))
                print(f"{mode}{dist} bn{bn} bw{bw} w{warps} st{stages}: {t*1e6:7.1f} us {n*kb/t/1e9:6.0f} GB/s", flush=True)
            except Exception as e:
                print(f"{mode}{dist} bn{bn} bw{bw} w{warps} st{stages}: ERROR {str(e)[:200]}")
    if len(sys.argv) > 1:
        dump = sys.argv[1]
        for p in glob.glob(os.path.join(dump, "**", "*.ptx"), recursive=True):
            txt = open(p).read()
            for name in re.findall(r"\.entry (\w+)", txt):
                pass
            c = {k: txt.count(k) for k in ("cp.async", "ld.global", "mma.sync", "wgmma", "bar.sync", "ld.shared")}
            if "diag" in txt or "jaxquant" in txt:
                print(os.path.basename(p), c)


if __name__ == "__main__":
    main()
