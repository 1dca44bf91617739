"""Prototype (not library code; lowered for CUDA on the CPU, NOT yet run on a GPU): weight-only
decode (M <= 64) in Mosaic GPU, with K split across CTAs.

Why: the Triton decode kernels stream int4 g128 weights at ~2.1 TB/s (half the H200's copy
bandwidth; 2.0-2.25x XLA's bf16 GEMV, target 3x) and int8 at ~3.1 TB/s (1.55-1.7x, target 1.8x).
Nsight Compute showed them issue- and latency-bound: every thread issues its own global loads and
~1.75 conversion instructions a weight. Here the memory warpgroup moves each ``[2 tn, 128]`` code
tile with one TMA copy (no per-thread load instructions, ``stages`` copies in flight a CTA), and
the two compute warpgroups only convert (Mosaic GPU's int4 -> bf16: ~1.5 instructions a weight)
and issue ``wgmma`` with the weights as the A operand from registers and x's ``[tm, 128]`` tile
(tm = 8 / 16 rows, the smallest wgmma N) as B: the library's prefill kernel
(``jaxquant.pallas.weight_only_mgpu``) with a K split, so that ``N / 2tn * splits`` work units
cover the 132 SMs (M = 16 without a split ran 0.57x bf16: 64 CTAs for 8192 rows).

Math as the library kernel (``jaxquant.pallas.weight_only_mgpu``): exact ``q`` in bfloat16, float32
accumulation, per-group partials scaled into a register carry (per channel: one accumulator,
scaled in the epilogue); each split writes float32 partials ``[splits, N, Mp]`` of ``y^T`` and
XLA sums them, casts and transposes (one small fusion).

Usage on an H100 / H200: ``PYTHONPATH=. python3 scripts/proto_wo_decode_mgpu.py OUT`` checks each
variant against the float32 reference (the library test's bound) and times chains of layers
against XLA's bf16 matmul and the library's weight_only_linear (Triton at decode); results go to
``OUT/wo_decode_mgpu.json`` after every row. On the CPU, ``--lower`` lowers every variant for CUDA.
"""
import functools
import json
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxquant.pallas.mgpu_common import store_tiles

TK = 128  # k a pipeline step


def wo_decode_mgpu(x, codes, scale, *, bits=4, group=128, tn=64, tm=16, stages=8, splits=4, num_sms=132,
                   grid_tile_width=8, parts_only=False):
    """``x [M, K] @ dequant(codes, scale)^T`` in x's dtype (bfloat16), symmetric codes."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = codes.shape[0]
    cn = 2 * tn
    mp = pl.cdiv(m, tm) * tm
    k_iters = k // TK
    assert n % cn == 0 and k % TK == 0 and k_iters % splits == 0, (n, k, splits)
    ks = k_iters // splits  # steps a split
    grouped = group is not None
    if grouped:
        assert TK % group == 0 or group % TK == 0
        assert (ks * TK) % group == 0, "a split must hold whole groups"
    m_iters, n_iters = mp // tm, n // cn
    units = m_iters * n_iters * splits
    xp = x if mp == m else jnp.pad(x, ((0, mp - m), (0, 0)))
    c = lax.bitcast_convert_type(codes, jnp.int4).reshape(n, k) if bits == 4 else codes
    n_groups = k // group if grouped else 1
    st = jnp.reshape(scale, (n, n_groups)).T.astype(jnp.float32)  # [groups, N]

    c_swz = plgpu.find_swizzle(TK * bits)
    c_t = (plgpu.TilingTransform((8, c_swz * 8 // bits)), plgpu.SwizzleTransform(c_swz))
    x_swz = plgpu.find_swizzle(TK * 16)
    x_t = (plgpu.TilingTransform((8, x_swz // 2)), plgpu.SwizzleTransform(x_swz))
    epi = min(32, tm)
    o_swz = plgpu.find_swizzle(epi * 32)
    o_t = (plgpu.TilingTransform((8, o_swz // 4)), plgpu.SwizzleTransform(o_swz))
    sub = TK if not grouped else min(group, TK)
    n_sub = TK // sub
    in_specs = [plgpu.BlockSpec((cn, TK), lambda kk: (0, kk), transforms=c_t),
                plgpu.BlockSpec((tm, TK), lambda kk: (0, kk), transforms=x_t)]
    if grouped:
        rows = max(1, TK // group)
        per = max(1, group // TK)
        in_specs.append(plgpu.BlockSpec((rows, cn), lambda kk: (kk // per, 0)))
    g_span = ks * TK // group if grouped else 1  # scale rows a split

    def body(c_gmem, x_gmem, s_gmem, o_gmem):
        def pipeline(step, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                step, grid=(ks,), memory_registers=40, in_specs=in_specs,
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, compute_context=ctx)

        nothing = lambda *_, **__: None
        piped = [c_gmem, x_gmem] + ([s_gmem] if grouped else [])

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(*piped),
            o_smem=plgpu.SMEM((2, 2, tn, epi), jnp.float32, transforms=o_t),
            v_smem=plgpu.SMEM((2, tn), jnp.float32),
            bar=plgpu.Barrier(num_barriers=2, num_arrivals=1),
            collective_axes="wg",
        )
        def scope(allocs, o_smem, v_smem, bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((units,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                si = lin % splits
                mi, ni = plgpu.planar_snake(lin // splits, (m_iters, n_iters), 1, grid_tile_width)
                wg_rows = pl.ds(ni * cn + wg * tn, tn)

                def row_vec(ref):
                    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))

                def finish(y):
                    if not grouped:
                        plgpu.barrier_wait(bar.at[wg])
                        y = y * lax.broadcast_in_dim(row_vec(v_smem.at[wg]), (tn, tm), (0,))
                    store_tiles(y, o_smem, wg, lambda e: o_gmem.at[si, wg_rows, pl.ds(mi * tm + e * epi, epi)], epi)

                def ctx(run):
                    if grouped:
                        zero = plgpu.layout_cast(jnp.full((tn, tm), 0, jnp.float32), plgpu.Layout.WGMMA)
                        finish(run(zero))
                        return
                    plgpu.copy_gmem_to_smem(s_gmem.at[0, wg_rows], v_smem.at[wg], bar.at[wg])

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tn, tm), jnp.float32))
                    def _(acc_ref):
                        run(acc_ref)
                        finish(acc_ref[...])

                def step(_, c_smem, x_smem, *rest):
                    w = c_smem[pl.ds(wg * tn, tn)].astype(jnp.bfloat16)
                    if not grouped:
                        (acc_ref,) = rest
                        plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(x_smem, (1, 0)))
                        plgpu.wgmma_wait(0)
                        return acc_ref
                    s_smem, total = rest
                    for j in range(n_sub):
                        wj = w if n_sub == 1 else w[:, j * sub:(j + 1) * sub]
                        xj = plgpu.transpose_ref(x_smem if n_sub == 1 else x_smem.at[:, pl.ds(j * sub, sub)], (1, 0))

                        def one_group(acc_ref, wj=wj, xj=xj):
                            plgpu.wgmma(acc_ref, wj, xj)
                            return acc_ref[...]

                        part = pl.run_scoped(one_group, plgpu.ACC((tn, tm), jnp.float32))
                        s = row_vec(s_smem.at[j, pl.ds(wg * tn, tn)])
                        total = total + part * lax.broadcast_in_dim(s, (tn, tm), (0,))
                    return total

                kcols = pl.ds(si * ks * TK, ks * TK)
                views = [c_gmem.at[pl.ds(ni * cn, cn), kcols], x_gmem.at[pl.ds(mi * tm, tm), kcols]]
                if grouped:
                    views.append(s_gmem.at[pl.ds(si * g_span, g_span), pl.ds(ni * cn, cn)])
                pipeline(step, ctx)(*views, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
        grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="jaxquant_wo_decode_mgpu_proto")
    parts = f(c, xp, st)
    if parts_only:  # the kernel alone (timing the XLA reduction's share)
        return parts
    return jnp.sum(parts, axis=0)[:, :m].T.astype(x.dtype)


CASES = [  # (bits, group), [(M, N, K)], [kernel keyword variants]
    ((4, 128), [(1, 8192, 8192), (16, 8192, 8192), (1, 4096, 14336), (16, 4096, 14336), (1, 14336, 4096)],
     [dict(splits=2), dict(splits=4), dict(splits=8), dict(splits=4, tn=128), dict(splits=4, stages=4),
      dict(splits=4, stages=12)]),
    ((8, None), [(1, 8192, 8192), (16, 8192, 8192)],
     [dict(splits=2), dict(splits=4), dict(splits=8), dict(splits=4, tn=128, stages=5)]),
]


def _variants(kw, m):
    """The smallest x tile (wgmma N) that holds M's rows: 8 or 16."""
    return dict(kw, tm=8 if m <= 8 else 16)


def main(out):
    import jaxquant as jq
    from jaxquant.bench.harness import CHAIN_LAYERS, chain, timeit

    os.makedirs(out, exist_ok=True)
    rows = []
    for (bits, group), shapes, variants in CASES:
        for (m, n, k) in shapes:
            key = jax.random.PRNGKey(0)
            ws = [(jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
                  for i in range(CHAIN_LAYERS)]
            qws = [jq.quantize_weight(w, bits=bits, group_size=group) for w in ws]
            xs = tuple(jax.random.normal(jax.random.PRNGKey(100 + i), (m, k), jnp.bfloat16)
                       for i in range(CHAIN_LAYERS))
            tb = timeit(chain(jax.jit(lambda x, w: x @ w.T)), [(xs, *((w,) for w in ws))]) / CHAIN_LAYERS
            tl = timeit(chain(jax.jit(lambda x, qw: jq.weight_only_linear(x, qw))),
                        [(xs, *((q,) for q in qws))]) / CHAIN_LAYERS
            ref = np.asarray(xs[0], np.float64) @ np.asarray(jq.dequantize_weight(qws[0]), np.float64).T
            mag = np.abs(np.asarray(xs[0], np.float64)) @ np.abs(np.asarray(jq.dequantize_weight(qws[0]), np.float64)).T
            bound = 2 * (k + 2) * 2.0**-24 * mag + 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
            for kw in variants:
                kw = _variants(kw, m)
                row = dict(shape=[m, n, k], bits=bits, group=group, kw=kw, bf16_us=tb * 1e6, library_us=tl * 1e6)
                try:
                    f = jax.jit(lambda x, qw, kw=kw: wo_decode_mgpu(x, qw.codes, qw.scale, bits=bits, group=group, **kw))
                    y = np.asarray(f(xs[0], qws[0]), np.float64)
                    row.update(worst_vs_bound=float((np.abs(y - ref) / bound).max()))
                    t = timeit(chain(f), [(xs, *((q,) for q in qws))]) / CHAIN_LAYERS
                    fk = jax.jit(lambda x, qw, kw=kw: wo_decode_mgpu(x, qw.codes, qw.scale, bits=bits, group=group,
                                                                     parts_only=True, **kw))
                    row.update(kernel_us=timeit(chain(fk), [(xs, *((q,) for q in qws))]) / CHAIN_LAYERS * 1e6)
                    moved = qws[0].nbytes + m * k * 2 + m * n * 2
                    row.update(us=t * 1e6, vs_bf16=tb / t, vs_library=tl / t, tbps=moved / t / 1e12)
                except Exception as e:  # report, do not stop the sweep
                    row.update(error=str(e)[:400])
                print({a: (round(v, 3) if isinstance(v, float) else v) for a, v in row.items()}, flush=True)
                rows.append(row)
                json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                          open(os.path.join(out, "wo_decode_mgpu.json"), "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--lower"]:
        S = jax.ShapeDtypeStruct
        for (bits, group), shapes, variants in CASES:
            for (m, n, k) in shapes:
                for kw in variants:
                    kw = _variants(kw, m)
                    f = jax.jit(lambda x, c, s, kw=kw: wo_decode_mgpu(x, c, s, bits=bits, group=group, **kw))
                    f.trace(S((m, k), jnp.bfloat16), S((n, k * bits // 8), jnp.int8),
                            S((n, k // group if group else 1), jnp.float32)).lower(lowering_platforms=("cuda",))
                    print("lowered", bits, group, (m, n, k), kw)
    else:
        main(sys.argv[1])
