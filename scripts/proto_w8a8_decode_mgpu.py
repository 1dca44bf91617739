"""Prototype (not library code): the W8A8 int8 GEMM at decode (M <= 16) in Mosaic GPU, both
operands streamed by TMA into shared memory.

Result (H200, session 9, ``benchmarks/results/session9/w8a8_decode_mgpu.json``): bit-exact in all
30 variants, but the GEMM alone streams 2.4-3.3 TB/s, below the Triton decode GEMM's 3.6-3.8:
not a base for in-kernel activation quantization. Kept in git only.

Question it answers (#3, decode >= 1.8x bf16): can a warp-specialised, TMA-fed GEMM stream int8
weights faster than the Triton decode GEMM (3.6-3.8 TB/s on an H200, session 4 profile)?

* The weight-only Mosaic GPU decode prototype (session 8, ``wo_decode_mgpu.json``) streamed only
  ~1.5-2.6 TB/s. Its compute warpgroups loaded every code tile from shared memory into registers
  and converted it. Here nothing goes through registers: ``wgmma`` s8 x s8 -> s32 reads the
  ``[64, 128]`` weight tile (A) and the activation's ``[tm, 128]`` code tile (B, tm = 8 / 16 rows,
  wgmma's N) straight from shared memory. The compute warpgroups only issue wgmma and wait.
* If this streams faster than Triton, the next step is to quantize the activation in the kernel.
  At M = 1 the compute warpgroups would read x's row for its amax while the memory warpgroup
  already streams weights. At M = 16 a grid-wide reduction would be needed (see the session-8
  closing note).

Math: exact int32 accumulation; each split writes int32 partials ``[splits, N, Mp]`` of ``acc^T``;
XLA sums them (exact) and applies the reference epilogue ``(f32(acc) * a_scale) * w_scale`` (the
library's ``int8_epilogue``). So the result must equal ``jaxquant.quantized_linear`` bit for bit
(checked per variant).

Usage on an H100 / H200: ``PYTHONPATH=. python3 scripts/proto_w8a8_decode_mgpu.py OUT`` compares each
variant with the library bit for bit and times chains of layers (the bench's method) against
XLA's bf16 matmul and ``quantized_linear`` (Triton at decode). It writes ``OUT/w8a8_decode_mgpu.json``
after every row, including ``gemm_us`` (this GEMM on pre-quantized codes, without the
quantization kernel). On the CPU, ``--lower`` lowers every variant for CUDA.
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

from jaxquant.pallas.mgpu_common import (persistent_kernel, pipeline_allocations, store_tiles, tile_loop,
                                         warp_specialized_pipeline)

TK = 128  # int8 K a pipeline step (one 128-byte swizzled row)


def int8_decode_parts(q, w, *, tn=64, tm=8, stages=8, splits=4, num_sms=132, grid_tile_width=8):
    """int32 partials ``[splits, N, Mp]`` of ``(q [M, K] @ w [N, K]^T)^T``, int8 operands."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = q.shape
    n = w.shape[0]
    cn = 2 * tn
    mp = pl.cdiv(m, tm) * tm
    k_iters = k // TK
    assert n % cn == 0 and k % TK == 0 and k_iters % splits == 0, (n, k, splits)
    ks = k_iters // splits  # steps a split
    n_iters, m_iters = n // cn, mp // tm
    qp = q if mp == m else jnp.pad(q, ((0, mp - m), (0, 0)))

    swz = plgpu.find_swizzle(TK * 8)
    in_t = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
    epi = tm
    o_swz = plgpu.find_swizzle(epi * 32)
    o_t = (plgpu.TilingTransform((8, o_swz // 4)), plgpu.SwizzleTransform(o_swz))
    pipeline = warp_specialized_pipeline(
        [plgpu.BlockSpec((cn, TK), lambda kk: (0, kk), transforms=in_t),
         plgpu.BlockSpec((tm, TK), lambda kk: (0, kk), transforms=in_t)], ks, stages)

    def body(w_gmem, q_gmem, o_gmem):
        @functools.partial(
            pl.run_scoped,
            allocs=pipeline_allocations(pipeline, w_gmem, q_gmem),
            o_smem=plgpu.SMEM((2, 2, tn, epi), jnp.int32, transforms=o_t),
            collective_axes="wg",
        )
        def scope(allocs, o_smem):
            wg = lax.axis_index("wg")

            # one "row" of the tile grid per (x tile, split): a unit is (x tile, split, W tile)
            @tile_loop(m_iters * splits, n_iters, minor=1, grid_tile_width=grid_tile_width)
            def tile(ms, ni):
                mi, si = ms // splits, ms % splits
                wg_rows = pl.ds(ni * cn + wg * tn, tn)

                def ctx(run):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tn, tm), jnp.int32))
                    def _(acc_ref):
                        run(acc_ref)
                        store_tiles(acc_ref[...], o_smem, wg,
                                    lambda e: o_gmem.at[si, wg_rows, pl.ds(mi * tm + e * epi, epi)], epi)

                def step(_, w_smem, q_smem, acc_ref):
                    plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * tn, tn)], plgpu.transpose_ref(q_smem, (1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref

                kcols = pl.ds(si * ks * TK, ks * TK)
                pipeline(step, ctx)(w_gmem.at[pl.ds(ni * cn, cn), kcols], q_gmem.at[pl.ds(mi * tm, tm), kcols],
                                    allocations=allocs)

    f = persistent_kernel(body, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.int32),
                          kernel_name="jaxquant_w8a8_decode_mgpu_proto", num_sms=num_sms)
    return f(w, qp)


def linear(x, qw, *, parts_only=False, **kw):
    """W8A8 ``x @ W^T``: the library's activation quantization, this GEMM, the library's epilogue
    (``jaxquant.reference.int8_epilogue``, as its split-K path)."""
    import jaxquant as jq
    from jaxquant import reference as ref

    m = x.shape[0]
    q, s, _ = jq.dynamic_quantize(x)  # the library's fused per-token kernel (int8 codes, float32 scales)
    parts = int8_decode_parts(q, qw.codes, **kw)
    if parts_only:
        return parts
    acc = jnp.sum(parts, axis=0)[:, :m].T  # int32, exact
    return ref.int8_epilogue(acc, jnp.reshape(s, (m, 1)), qw.scale, None, x.dtype)


CASES = [  # [(M, N, K)], [kernel keyword variants]; tm: the smallest x tile (8 / 16 rows) holding M
    ([(1, 8192, 8192), (16, 8192, 8192), (1, 4096, 14336), (16, 4096, 14336), (1, 14336, 4096)],
     [dict(splits=2), dict(splits=4), dict(splits=8), dict(splits=4, tn=128, stages=5), dict(splits=4, stages=4),
      dict(splits=4, stages=10)]),
]


def _kw(kw, m):
    return dict(kw, tm=8 if m <= 8 else 16)


def main(out):
    import jaxquant as jq
    from jaxquant.bench.harness import CHAIN_LAYERS, chain, timeit

    os.makedirs(out, exist_ok=True)
    rows = []
    for shapes, variants in CASES:
        for (m, n, k) in shapes:
            key = jax.random.PRNGKey(0)
            ws = [(jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
                  for i in range(CHAIN_LAYERS)]
            qws = [jq.quantize_weight(w, bits=8) for w in ws]
            xs = tuple(jax.random.normal(jax.random.PRNGKey(100 + i), (m, k), jnp.bfloat16)
                       for i in range(CHAIN_LAYERS))
            tb = timeit(chain(jax.jit(lambda x, w: x @ w.T)), [(xs, *((w,) for w in ws))]) / CHAIN_LAYERS
            lib = jax.jit(lambda x, qw: jq.quantized_linear(x, qw))
            tl = timeit(chain(lib), [(xs, *((q,) for q in qws))]) / CHAIN_LAYERS
            want = np.asarray(lib(xs[0], qws[0]), np.float32)
            for kw in variants:
                kw = _kw(kw, m)
                row = dict(shape=[m, n, k], kw=kw, bf16_us=tb * 1e6, library_us=tl * 1e6)
                try:
                    f = jax.jit(lambda x, qw, kw=kw: linear(x, qw, **kw))
                    got = np.asarray(f(xs[0], qws[0]), np.float32)
                    row.update(bit_exact=bool(np.array_equal(got, want, equal_nan=True)),
                               mismatches=int(np.sum(got != want)))
                    t = timeit(chain(f), [(xs, *((q,) for q in qws))]) / CHAIN_LAYERS
                    codes = [jq.dynamic_quantize(x)[0] for x in xs]  # the GEMM alone, on pre-quantized codes
                    g = jax.jit(lambda q, qw, kw=kw: int8_decode_parts(q, qw.codes, **kw))
                    tg = timeit(chain(g), [(tuple(codes), *((q,) for q in qws))]) / CHAIN_LAYERS
                    row.update(us=t * 1e6, gemm_us=tg * 1e6, vs_bf16=tb / t, vs_library=tl / t,
                               gemm_tbps=n * k / tg / 1e12)
                except Exception as e:  # report, do not stop the sweep
                    row.update(error=str(e)[:400])
                print({a: (round(v, 3) if isinstance(v, float) else v) for a, v in row.items()}, flush=True)
                rows.append(row)
                json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                          open(os.path.join(out, "w8a8_decode_mgpu.json"), "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--lower"]:
        import jaxquant as jq

        S = jax.ShapeDtypeStruct
        for shapes, variants in CASES:
            for (m, n, k) in shapes:
                qw = jax.eval_shape(lambda w: jq.quantize_weight(w, bits=8), S((n, k), jnp.float32))
                for kw in variants:
                    kw = _kw(kw, m)
                    f = jax.jit(lambda x, qw, kw=kw: linear(x, qw, **kw))
                    txt = f.trace(S((m, k), jnp.bfloat16), qw).lower(lowering_platforms=("cuda",)).as_text()
                    assert "jaxquant_w8a8_decode_mgpu_proto" in txt
                    print("lowered", (m, n, k), kw)
    else:
        main(sys.argv[1])
