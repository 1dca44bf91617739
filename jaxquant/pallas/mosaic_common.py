"""The Mosaic GPU skeleton shared by the Hopper GEMMs: the warp-specialised TMA pipeline, the
persistent grid and the tiled TMA store of the epilogue."""

from __future__ import annotations

import jax

SMEM_BUDGET = 220 * 1024  # of the 227 KiB a CTA may use on Hopper (scales and barriers need a little)


def store_tiles(y, o_smem, wg, dst, epi: int):
    """Write registers ``y [rows, cols]`` to global memory in ``cols / epi`` column tiles.

    Each tile goes through ``o_smem[wg, slot]`` (two slots a warpgroup, so one tile's TMA store
    overlaps the next tile's copy into shared memory) to ``dst(e)``, the global-memory window of
    tile ``e``. Waits first for this warpgroup's previous stores to have read their buffers.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for e in range(y.shape[1] // epi):
        slot = e % 2
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        o_smem[wg, slot] = y[:, e * epi:(e + 1) * epi]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg, slot], dst(e))


# ----------------------------------------------------------------------------------------
# The skeleton both Mosaic GPU GEMMs share: persistent (one CTA per SM walks the output tiles)
# and warp-specialised (warpgroup "wg" 2 issues the TMA copies of a ``stages``-deep ring of
# K steps, warpgroups 0 and 1 compute).
# ----------------------------------------------------------------------------------------

COMPUTE_WGS = 2  # compute warpgroups a CTA; the memory warpgroup is the third
MEMORY_REGISTERS = 40  # registers a thread of the memory warpgroup keeps (the rest go to compute)


def warp_specialized_pipeline(in_specs, k_iters: int, stages: int):
    """``pipeline(step, ctx)``: the K loop over ``in_specs``' blocks, ``stages`` steps in flight,
    ``step`` run by both compute warpgroups inside ``ctx`` (see
    ``plgpu.emit_pipeline_warp_specialized``). ``pipeline_allocations(pipeline, *refs)`` sizes its
    shared-memory ring."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def pipeline(step, ctx):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(k_iters,), memory_registers=MEMORY_REGISTERS, in_specs=in_specs, wg_axis="wg",
            num_compute_wgs=COMPUTE_WGS, max_concurrent_steps=stages, compute_context=ctx)

    return pipeline


def pipeline_allocations(pipeline, *gmem_refs):
    """The shared-memory buffers (and barriers) of ``pipeline``'s ring for these global operands:
    allocated once, outside the tile loop, and passed to every tile's pipeline."""
    nothing = lambda *_, **__: None
    return pipeline(nothing, nothing).get_allocations(*gmem_refs)


def tile_loop(m_iters: int, n_iters: int, *, minor: int, grid_tile_width: int):
    """Decorator: run ``fn(mi, ni)`` for every output tile of an ``m_iters x n_iters`` grid, the
    tiles spread over the CTAs (axis "sm") in a planar snake (``grid_tile_width`` tiles of the
    ``minor`` dimension at a time, so neighbouring CTAs share operand tiles in L2)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def deco(fn):
        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _(info):
            (lin,) = info.index
            fn(*plgpu.planar_snake(lin, (m_iters, n_iters), minor, grid_tile_width))

    return deco


def persistent_kernel(body, *, out_type, kernel_name: str, num_sms: int):
    """``body(*gmem_refs)`` as a kernel of ``num_sms`` CTAs ("sm") of 3 warpgroups ("wg"); the
    CTA waits for its last TMA stores before it exits."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def kernel_body(*refs):
        body(*refs)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return plgpu.kernel(
        kernel_body, out_type=out_type, grid=(num_sms,), grid_names=("sm",), num_threads=COMPUTE_WGS + 1,
        thread_name="wg", compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name=kernel_name)
