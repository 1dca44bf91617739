"""Prototype (not library code, not verified on a GPU yet): W4A16 group-128 prefill GEMM in Mosaic GPU.

Why: the Triton weight-only kernel reaches 0.45-0.5x XLA's bf16 matmul at M >= 2048 (target
0.9x): its per-group float32 partial sums serialise Triton's wgmma pipeline. Here two compute
warpgroups (warp-specialised, TMA-fed, persistent) overlap one another's per-group scaling with
their tensor-core work.

Math (the library's layout: ``codes`` int8 ``[N, K/2]``, byte j = k 2j in the low nibble and
2j+1 in the high nibble, symmetric signed int4; ``scale`` float32 ``[N, K/128]``)::

    y^T[n, m] = sum_g s[n, g] * ( sum_{j in g} lo[n, j] * x[m, 2j] + hi[n, j] * x[m, 2j+1] )

computed transposed: the dequantised weight (``((c & 15) ^ 8) - 8`` and ``(c & -16) / 16``, exact in bf16)
is wgmma's A operand from registers, x's even / odd columns (two XLA slices) its B operand from
shared memory; each group's partial sum is a fresh float32 accumulator, scaled by its row's
scale and added to the running total (a loop carry in registers). The kernel writes y^T and XLA
transposes it (a prototype; ~4% of the time at M = 2048 on 8192^2).

Usage on an H100 / H200: ``PYTHONPATH=. python3 scripts/proto_w4_mgpu.py OUT`` -- checks against
the library's reference within the weight-only test bound, then times it against the Triton
kernel and XLA's bf16 matmul. On the CPU, ``--lower`` only lowers it for CUDA.
"""
import functools, json, os, sys

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

GROUP = 128


def w4_matmul_mgpu(x, codes, scale, *, tn=64, tm=128, stages=4, num_sms=132, grid_tile_width=8):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = codes.shape[0]
    kb = k // 2  # bytes a row of codes
    cn = 2 * tn  # two compute warpgroups split N
    assert m % tm == 0 and n % cn == 0 and k % GROUP == 0, (m, n, k)
    tkb = GROUP // 2  # code bytes a group: one pipeline step
    m_iters, n_iters, k_iters = m // tm, n // cn, kb // tkb
    xe, xo = x[:, 0::2], x[:, 1::2]  # [M, K/2] each
    st = scale.T.astype(jnp.float32)  # [K/128, N]: a step's scales are one contiguous row

    c_sw = plgpu.find_swizzle(tkb * 8)
    c_t = (plgpu.TilingTransform((8, c_sw)), plgpu.SwizzleTransform(c_sw))
    x_sw = plgpu.find_swizzle(tkb * 16)
    x_t = (plgpu.TilingTransform((8, x_sw // 2)), plgpu.SwizzleTransform(x_sw))
    epi = min(32, tm)
    o_sw = plgpu.find_swizzle(epi * 16)
    o_t = (plgpu.TilingTransform((8, o_sw // 2)), plgpu.SwizzleTransform(o_sw))

    def body(c_gmem, xe_gmem, xo_gmem, s_gmem, o_gmem):
        def pipeline(step, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                step, grid=(k_iters,), memory_registers=40,
                in_specs=[plgpu.BlockSpec((cn, tkb), lambda kk: (0, kk), transforms=c_t),
                          plgpu.BlockSpec((tm, tkb), lambda kk: (0, kk), transforms=x_t),
                          plgpu.BlockSpec((tm, tkb), lambda kk: (0, kk), transforms=x_t),
                          plgpu.BlockSpec((1, cn), lambda kk: (kk, 0))],
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, compute_context=ctx)

        nothing = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(c_gmem, xe_gmem, xo_gmem, s_gmem),
            o_smem=plgpu.SMEM((2, 2, tn, epi), jnp.bfloat16, transforms=o_t),
            collective_axes="wg",
        )
        def scope(allocs, o_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, grid_tile_width)
                rows_n = pl.ds(ni * cn, cn)
                rows_m = pl.ds(mi * tm, tm)

                def ctx(run):
                    zero = plgpu.layout_cast(jnp.full((tn, tm), 0, jnp.float32), plgpu.Layout.WGMMA)
                    total = run(zero).astype(jnp.bfloat16)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(tm // epi):
                        slot = e % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        o_smem[wg, slot] = total[:, e * epi:(e + 1) * epi]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[wg, slot],
                            o_gmem.at[pl.ds(ni * cn + wg * tn, tn), pl.ds(mi * tm + e * epi, epi)])

                def step(_, c_smem, xe_smem, xo_smem, s_smem, total):
                    c = c_smem[pl.ds(wg * tn, tn)]  # int8 [tn, 64]
                    # Mosaic GPU allows only bitwise ops on 8-bit values: the low nibble as offset
                    # binary ((c & 15) ^ 8 = q + 8), the high one in place (c & -16 = 16 q as int8),
                    # then exact bf16 arithmetic
                    lo = ((c & jnp.int8(0x0F)) ^ jnp.int8(0x08)).astype(jnp.bfloat16) - jnp.bfloat16(8)
                    hi = (c & jnp.int8(-16)).astype(jnp.bfloat16) * jnp.bfloat16(1 / 16)

                    def group(acc_ref):
                        plgpu.wgmma(acc_ref, lo, plgpu.transpose_ref(xe_smem, (1, 0)))
                        plgpu.wgmma(acc_ref, hi, plgpu.transpose_ref(xo_smem, (1, 0)))
                        return acc_ref[...]

                    part = pl.run_scoped(group, plgpu.ACC((tn, tm), jnp.float32))
                    s = plgpu.load(s_smem.at[0, pl.ds(wg * tn, tn)], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    return total + part * lax.broadcast_in_dim(s, (tn, tm), (0,))

                pipeline(step, ctx)(c_gmem.at[rows_n, :], xe_gmem.at[rows_m, :], xo_gmem.at[rows_m, :],
                                    s_gmem.at[:, rows_n], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((n, m), jnp.bfloat16),
        grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="jaxquant_w4a16_mgpu_proto")
    return f(codes, xe, xo, st).T


def wq_matmul_mgpu(x, codes, scale, *, bits=4, group=GROUP, tn=64, tm=128, stages=4, num_sms=132,
                   grid_tile_width=8):
    """Weight-only matmul, symmetric codes: ``bits`` 4 (``codes`` int8 ``[N, K/2]``, viewed as
    ``int4 [N, K]``: XLA packs the even element in the low nibble, our byte layout) or 8 (int8
    ``[N, K]``); ``group`` 128 (per-group partials scaled into a register carry) or None (per
    channel: one accumulator over K, scaled once). Mosaic GPU converts int4 -> bf16 with prmt +
    lop3, two values an instruction; x enters whole, one wgmma of K = 128 a pipeline step."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = codes.shape[0]
    cn = 2 * tn
    tk = GROUP
    assert m % tm == 0 and n % cn == 0 and k % tk == 0, (m, n, k)
    m_iters, n_iters, k_iters = m // tm, n // cn, k // tk
    c = lax.bitcast_convert_type(codes, jnp.int4).reshape(n, k) if bits == 4 else codes
    st = scale.reshape(n, -1).T.astype(jnp.float32)  # [groups, N]

    c_sw = plgpu.find_swizzle(tk * bits)
    c_t = (plgpu.TilingTransform((8, c_sw * 8 // bits)), plgpu.SwizzleTransform(c_sw))
    x_sw = plgpu.find_swizzle(tk * 16)
    x_t = (plgpu.TilingTransform((8, x_sw // 2)), plgpu.SwizzleTransform(x_sw))
    epi = min(32, tm)
    o_sw = plgpu.find_swizzle(epi * 16)
    o_t = (plgpu.TilingTransform((8, o_sw // 2)), plgpu.SwizzleTransform(o_sw))
    grouped = group is not None
    specs = [plgpu.BlockSpec((cn, tk), lambda kk: (0, kk), transforms=c_t),
             plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=x_t)]
    if grouped:
        specs.append(plgpu.BlockSpec((1, cn), lambda kk: (kk, 0)))

    def body(c_gmem, x_gmem, s_gmem, o_gmem):
        def pipeline(step, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                step, grid=(k_iters,), memory_registers=40, in_specs=specs,
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, compute_context=ctx)

        nothing = lambda *_, **__: None
        ins = (c_gmem, x_gmem, s_gmem) if grouped else (c_gmem, x_gmem)

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(*ins),
            o_smem=plgpu.SMEM((2, 2, tn, epi), jnp.bfloat16, transforms=o_t),
            s_smem=plgpu.SMEM((2, tn), jnp.float32),
            bar=plgpu.Barrier(num_barriers=2, num_arrivals=1),
            collective_axes="wg",
        )
        def scope(allocs, o_smem, s_smem, bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, grid_tile_width)

                def store(total):
                    total = total.astype(jnp.bfloat16)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(tm // epi):
                        slot = e % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        o_smem[wg, slot] = total[:, e * epi:(e + 1) * epi]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[wg, slot],
                            o_gmem.at[pl.ds(ni * cn + wg * tn, tn), pl.ds(mi * tm + e * epi, epi)])

                def ctx(run):
                    if grouped:
                        zero = plgpu.layout_cast(jnp.full((tn, tm), 0, jnp.float32), plgpu.Layout.WGMMA)
                        store(run(zero))
                        return
                    plgpu.copy_gmem_to_smem(s_gmem.at[0, pl.ds(ni * cn + wg * tn, tn)], s_smem.at[wg], bar.at[wg])

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tn, tm), jnp.float32))
                    def _(acc_ref):
                        run(acc_ref)
                        acc = acc_ref[...]
                        plgpu.barrier_wait(bar.at[wg])
                        sc = plgpu.load(s_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                        store(acc * lax.broadcast_in_dim(sc, (tn, tm), (0,)))

                def step(_, c_smem, x_smem, *rest):
                    w = c_smem[pl.ds(wg * tn, tn)].astype(jnp.bfloat16)  # exact: |q| <= 128
                    xt = plgpu.transpose_ref(x_smem, (1, 0))
                    if not grouped:
                        (acc_ref,) = rest
                        plgpu.wgmma(acc_ref, w, xt)
                        plgpu.wgmma_wait(0)
                        return acc_ref
                    s_smem_step, total = rest

                    def one_group(acc_ref):
                        plgpu.wgmma(acc_ref, w, xt)
                        return acc_ref[...]

                    part = pl.run_scoped(one_group, plgpu.ACC((tn, tm), jnp.float32))
                    sc = plgpu.load(s_smem_step.at[0, pl.ds(wg * tn, tn)], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    return total + part * lax.broadcast_in_dim(sc, (tn, tm), (0,))

                views = [c_gmem.at[pl.ds(ni * cn, cn), :], x_gmem.at[pl.ds(mi * tm, tm), :]]
                if grouped:
                    views.append(s_gmem.at[:, pl.ds(ni * cn, cn)])
                pipeline(step, ctx)(*views, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((n, m), jnp.bfloat16),
        grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="jaxquant_wq_mgpu_proto")
    return f(c, x, st).T


_PC = dict(group=None)
CASES = [  # (m, n, k), wq_matmul_mgpu keyword arguments (bits, group, tile)
    ((256, 256, 512), {}),
    ((256, 256, 512), dict(_PC)),
    ((256, 256, 512), dict(_PC, bits=8)),
    ((2048, 8192, 8192), {}),
    ((2048, 8192, 8192), dict(stages=3)),
    ((2048, 8192, 8192), dict(stages=5)),
    ((8192, 8192, 8192), {}),
    ((2048, 4096, 14336), {}),
    ((2048, 14336, 4096), {}),
    ((512, 8192, 8192), {}),
    ((128, 8192, 8192), {}),
    ((16, 8192, 8192), dict(tm=16, stages=8)),
    ((2048, 8192, 8192), dict(_PC)),
    ((2048, 8192, 8192), dict(_PC, tn=128)),
    ((2048, 8192, 8192), dict(_PC, tm=256, stages=2)),
    ((16, 8192, 8192), dict(_PC, tm=16, stages=8)),
    ((2048, 8192, 8192), dict(_PC, bits=8)),
    ((2048, 8192, 8192), dict(_PC, bits=8, tn=128, stages=3)),
    ((16, 8192, 8192), dict(_PC, bits=8, tm=16, stages=8)),
]


def main(out):
    import jaxquant as jq
    from jaxquant.bench.harness import timeit

    os.makedirs(out, exist_ok=True)
    rows, base = [], {}
    for (m, n, k), kw in CASES:
        bits, group = kw.get("bits", 4), kw.get("group", GROUP)
        r = np.random.default_rng(0)
        w = jnp.asarray(r.standard_normal((n, k)) * 0.02, jnp.float32)
        qw = jq.quantize_weight(w, bits=bits, group_size=group)
        x = jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16)
        row = dict(shape=[m, n, k], kw=kw)
        try:
            f = jax.jit(lambda x, c, s: wq_matmul_mgpu(x, c, s, **kw))
            got = f(x, qw.codes, qw.scale)
            ref = np.asarray(x, np.float32) @ np.asarray(jq.dequantize_weight(qw), np.float32).T
            row.update(max_abs_vs_f32=float(np.abs(np.asarray(got, np.float32) - ref).max()),
                       ref_scale=float(np.abs(ref).max()))
            t = timeit(f, [(x, qw.codes, qw.scale)])
            row.update(us=t * 1e6)
            key = (m, n, k, bits, group)
            if key not in base:
                g = jax.jit(lambda x, qw: jq.weight_only_linear(x, qw))  # the Triton kernel
                want = g(x, qw)
                tt = timeit(g, [(x, qw)])
                tb = base.get((m, n, k), {}).get("bf16_us")
                if tb is None:
                    tb = timeit(jax.jit(lambda x, w: x @ w.T), [(x, w.astype(jnp.bfloat16))]) * 1e6
                    base[(m, n, k)] = dict(bf16_us=tb)
                base[key] = dict(triton_us=tt * 1e6, bf16_us=tb,
                                 max_abs_triton_vs_f32=float(np.abs(np.asarray(want, np.float32) - ref).max()))
            b = base[key]
            row.update(b, vs_bf16=b["bf16_us"] / row["us"], triton_vs_bf16=b["bf16_us"] / b["triton_us"],
                       tflops=2 * m * n * k / t / 1e12)
        except Exception as e:  # report, do not stop the sweep
            row.update(error=str(e)[:600])
        print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
        rows.append(row)
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                  open(os.path.join(out, "wq_mgpu_proto.json"), "w"), indent=1)  # after every row: survives a timeout


if __name__ == "__main__":
    if sys.argv[1:] == ["--lower"]:
        S = jax.ShapeDtypeStruct
        for (m, n, k), kw in CASES:
            bits, group = kw.get("bits", 4), kw.get("group", GROUP)
            f = jax.jit(lambda x, c, s: wq_matmul_mgpu(x, c, s, **kw))
            f.trace(S((m, k), jnp.bfloat16), S((n, k * bits // 8), jnp.int8),
                    S((n, k // group if group else 1), jnp.float32)).lower(lowering_platforms=("cuda",))
            print("lowered", m, n, k, kw)
    else:
        main(sys.argv[1])
