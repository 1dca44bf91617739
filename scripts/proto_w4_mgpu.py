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
    epi = 32
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


def main(out):
    import jaxquant as jq
    from jaxquant.bench.harness import chain, timeit

    os.makedirs(out, exist_ok=True)
    rows = []
    for (m, n, k) in [(256, 256, 512), (2048, 4096, 4096), (2048, 8192, 8192), (8192, 8192, 8192),
                      (2048, 4096, 14336)]:
        r = np.random.default_rng(0)
        w = jnp.asarray(r.standard_normal((n, k)) * 0.02, jnp.float32)
        qw = jq.quantize_weight(w, bits=4, group_size=GROUP)
        x = jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16)
        row = dict(shape=[m, n, k])
        try:
            got = jax.jit(lambda x, c, s: w4_matmul_mgpu(x, c, s))(x, qw.codes, qw.scale)
            want = jax.jit(lambda x, qw: jq.weight_only_linear(x, qw))(x, qw)  # the Triton kernel
            ref = np.asarray(x, np.float32) @ np.asarray(jq.dequantize_weight(qw), np.float32).T
            row.update(max_abs_vs_f32=float(np.abs(np.asarray(got, np.float32) - ref).max()),
                       max_abs_triton_vs_f32=float(np.abs(np.asarray(want, np.float32) - ref).max()),
                       ref_scale=float(np.abs(ref).max()))
            t = timeit(jax.jit(lambda x, c, s: w4_matmul_mgpu(x, c, s)), [(x, qw.codes, qw.scale)])
            tt = timeit(jax.jit(lambda x, qw: jq.weight_only_linear(x, qw)), [(x, qw)])
            wb = w.astype(jnp.bfloat16)
            tb = timeit(jax.jit(lambda x, w: x @ w.T), [(x, wb)])
            row.update(us=t * 1e6, triton_us=tt * 1e6, bf16_us=tb * 1e6, vs_bf16=tb / t, triton_vs_bf16=tb / tt)
        except Exception as e:  # report, do not stop the sweep
            row.update(error=str(e)[:600])
        print(row, flush=True)
        rows.append(row)
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
              open(os.path.join(out, "w4_mgpu_proto.json"), "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--lower"]:
        S = jax.ShapeDtypeStruct
        for (m, n, k) in [(256, 256, 512), (2048, 4096, 14336)]:
            f = jax.jit(lambda x, c, s: w4_matmul_mgpu(x, c, s))
            f.trace(S((m, k), jnp.bfloat16), S((n, k // 2), jnp.int8), S((n, k // GROUP), jnp.float32)).lower(
                lowering_platforms=("cuda",))
            print("lowered", m, n, k)
    else:
        main(sys.argv[1])
