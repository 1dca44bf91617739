"""Diagnostic: compile the Pallas weight-only kernels' Triton IR with the `triton` package (on the GPU
machine) to read their TTGIR/PTX: register use, spills, cp.async pipelining, vector widths.
Usage: python3 scripts/diag_ttgir.py OUTDIR  (H100/H200; not part of the suite)."""
import contextlib, functools, io, os, re, sys, types
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
import jaxquant as jq
from jaxquant.pallas import weight_only as K


def ttir_of(m, n, k, bits, group, cfg):
    shim = types.SimpleNamespace(**{a: getattr(pl, a) for a in dir(pl) if not a.startswith('__')})
    shim.pallas_call = functools.partial(pl.pallas_call, debug=True)
    K.pl = shim
    qw = jax.eval_shape(lambda w: jq.quantize_weight(w, bits=bits, group_size=group), jax.ShapeDtypeStruct((n, k), jnp.float32))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.jit(lambda x, q: jq.weight_only_linear(x, q, config=cfg)).trace(x, qw).lower(lowering_platforms=("cuda",))
    K.pl = pl
    txt = buf.getvalue()
    start = txt.index("module @")
    mod = txt[start:]
    mod = mod.replace(" [unknown]", "")
    mod = re.sub(r'\s*"[^"\n]*"\(#loc\d*\)', '', mod)  # drop named locations
    mod = re.sub(r'\s*loc\([^\n]*\)', '', mod)
    end = mod.rindex("}")
    mod = mod[:end + 1]
    mod = "\n".join(l for l in mod.splitlines() if not l.startswith("#loc"))
    return mod


def main(out):
    import triton
    os.makedirs(out, exist_ok=True)
    cases = {
        "w4g128_dec_16x64x512": (16, 8192, 8192, 4, 128, K.Config(16, 64, 512, 1, 4, 4)),
        "w4g128_dec_16x32x512": (16, 8192, 8192, 4, 128, K.Config(16, 32, 512, 1, 4, 4)),
        "w8_dec_16x64x256": (16, 8192, 8192, 8, None, K.Config(16, 64, 256, 1, 4, 4)),
        "w4g128_pre_128x128x128": (2048, 8192, 8192, 4, 128, K.Config(128, 128, 128, 1, 8, 3)),
    }
    for name, (m, n, k, bits, group, cfg) in cases.items():
        try:
            mod = ttir_of(m, n, k, bits, group, cfg)
            p = os.path.join(out, name + ".ttir")
            open(p, "w").write(mod)
            c = triton.compile(p, target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            ptx = c.asm["ptx"]
            open(os.path.join(out, name + ".ttgir"), "w").write(c.asm["ttgir"])
            open(os.path.join(out, name + ".ptx"), "w").write(ptx)
            stats = {kk: ptx.count(kk) for kk in ("cp.async", "ld.global", "ld.global.v4", "ld.global.nc.v4", "mma.sync",
                                                  "wgmma", "ldmatrix", "bar.sync", "st.shared", "ld.shared", "prmt", "lop3",
                                                  "cvt.rn.bf16", "cvt.rn.f32.s", "fma.rn.bf16x2")}
            print(name, "regs", c.n_regs, "spills", c.n_spills, stats, flush=True)
        except Exception as e:
            print(name, "ERROR", str(e)[:1500], flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
