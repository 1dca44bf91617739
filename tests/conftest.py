"""Shared test fixtures: implementation tiers, input generators with edge values, exact comparisons.

Tiers: ``reference`` (plain jnp), ``interpret`` (the Pallas kernels in interpret mode, CPU) and
``pallas`` (the real kernels; only where a CUDA GPU is present). On a machine without a GPU
we run JAX on the CPU explicitly (``JAX_PLATFORMS=cpu``) so that an installed CUDA plugin (used
only to *lower* kernels for CUDA) does not try to initialise.
"""

import os
import re
import shutil
import sys
import zlib

_GPU_MACHINE = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")
if "JAX_PLATFORMS" not in os.environ and not _GPU_MACHINE:
    os.environ["JAX_PLATFORMS"] = "cpu"
# The sharding tests (tests/sharding) partition over 8 CPU devices: XLA makes them from the host
# when this flag is set before jax initialises its backends (unsharded tests run on device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The CUDA plugin that lets a CPU machine lower kernels for CUDA lives outside the venv (Makefile:
# .cuda-plugin), so that only the tests load it.
_CUDA_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cuda-plugin")
if not _GPU_MACHINE and os.path.isdir(_CUDA_PLUGIN):
    sys.path.append(_CUDA_PLUGIN)

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
if HAS_GPU:
    # XLA:GPU runs float32 matmuls in TF32 by default; the float references in the tests (layers,
    # MiniLM, conversion bounds) are float32 math, as on the CPU.
    jax.config.update("jax_default_matmul_precision", "highest")
# On a GPU the real kernels are the tier (interpret mode is CI's, on the CPU).
TIERS = ["pallas"] if HAS_GPU else ["interpret"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(params=TIERS)
def tier(request):
    """An implementation tier of the kernels, compared against the reference."""
    return request.param


# Fresh random inputs on every run; set JAXQUANT_TEST_SEED to replay a run (the header prints it).
BASE_SEED = int(os.environ.get("JAXQUANT_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))


def pytest_report_header(config):
    return f"jaxquant: JAXQUANT_TEST_SEED={BASE_SEED}, jax {jax.__version__}, devices {jax.devices()}"


@pytest.fixture
def rng(request):
    """A generator seeded from the run's base seed and the test's id."""
    return np.random.default_rng([BASE_SEED, zlib.crc32(request.node.nodeid.encode())])


def cpu_cycled(cases, variants, case_ids, variant_ids):
    """``pytest.param``s of ``cases`` x ``variants``: the whole cross product on a GPU; on the CPU
    (interpret mode, ~1 s a case) each case with one variant, in turn, so that every case and
    every variant is still run."""
    out = []
    for i, (case, cid) in enumerate(zip(cases, case_ids)):
        for j, (variant, vid) in enumerate(zip(variants, variant_ids)):
            if HAS_GPU or j == i % len(variants):
                out.append(pytest.param(*case, variant, id=f"{cid}-{vid}"))
    return out


def run_impl(impl, fn, *args):
    """Trace and run ``fn`` under implementation ``impl``.

    ``jax.jit`` caches traces per Python function, whatever ``jaxquant.implementation`` was then;
    a fresh wrapper per call makes each tier trace anew (else tiers would silently share a trace).
    """
    def fresh(*a):
        return fn(*a)

    if impl in ("reference", "interpret"):
        # The contract is with the reference on the CPU backend, and interpret mode is the CPU tier
        # (XLA:GPU's float32 division is not correctly rounded); a no-op on a CPU-only machine.
        args = jax.device_put(args, jax.devices("cpu")[0])
    with jq.implementation(impl):
        return jax.jit(fresh)(*args)


def assert_same_bits(a, b, what=""):
    """Exact equality: same dtype/shape, NaN at the same places, other elements bit-identical
    (floats of every width, bfloat16 and fp8 included; a NaN's payload is not compared: e5m2 has
    several NaN encodings)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if jnp.issubdtype(a.dtype, jnp.floating):
        fa, fb = a.astype(np.float64), b.astype(np.float64)
        na, nb = np.isnan(fa), np.isnan(fb)
        assert (na == nb).all(), f"{what}: NaN positions differ ({int((na != nb).sum())} elements)"
        ua = a.view(f"u{a.dtype.itemsize}")[~na]
        ub = b.view(f"u{b.dtype.itemsize}")[~nb]
        bad = ua != ub
        assert not bad.any(), (f"{what}: {int(bad.sum())}/{ua.size} elements differ, e.g. "
                               f"{fa[~na][bad][:5]} vs {fb[~nb][bad][:5]}")
    else:
        bad = a != b
        assert not bad.any(), f"{what}: {int(bad.sum())}/{a.size} codes differ, e.g. {a[bad][:5]} vs {b[bad][:5]}"


def make_params(rng, pshape, *, qmin, qmax, asymmetric, pow2):
    """Positive scales (powers of two when ``pow2``, so ties are exact) and zero points in range."""
    if pow2:
        scale = 2.0 ** rng.integers(-6, 1, size=pshape)
    else:
        scale = rng.uniform(0.003, 0.2, size=pshape)
    scale = np.asarray(scale, np.float32)
    zp = None
    if asymmetric:
        zp = np.asarray(rng.integers(qmin, qmax + 1, size=pshape), np.int32)
    return scale, zp


def make_x(rng, shape, dtype, scale_b, zp_b, *, qmin, qmax, specials=True):
    """Random x spanning past the clamp range, with .5 ties, clamp edges, zeros, NaN and +-Inf.

    ``scale_b`` / ``zp_b``: the parameters broadcast to x's shape (float64 / int arrays).
    """
    span = (qmax - qmin + 1) * 0.75
    x = rng.standard_normal(shape) * span * scale_b
    if specials and x.size:
        flat = x.reshape(-1)
        sb = np.broadcast_to(scale_b, shape).reshape(-1)
        zb = np.broadcast_to(zp_b if zp_b is not None else 0, shape).reshape(-1)
        n = flat.size
        idx = rng.choice(n, size=max(1, n // 4), replace=False)
        k = rng.integers(qmin - 3, qmax + 3, size=idx.size) - zb[idx]
        flat[idx] = (k + 0.5) * sb[idx]  # ties (exact when the scale is a power of two)
        idx2 = rng.choice(n, size=max(1, n // 16), replace=False)
        edges = np.array([qmin - 0.5, qmin - 0.51, qmin, qmax, qmax + 0.49, qmax + 0.5, qmax + 0.51, 0.0])
        flat[idx2] = (rng.choice(edges, idx2.size) - zb[idx2]) * sb[idx2]
        for v in (np.nan, np.inf, -np.inf, 0.0, -0.0):
            flat[rng.integers(0, n)] = v
        x = flat.reshape(shape)
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def skip_without_cuda_lowering(e):
    """Skip a CUDA-lowering test on a machine without the CUDA plugin (``make test`` installs it);
    in CI (``CI`` set) a missing plugin is an error, not a skip."""
    if "cuda" in str(e).lower() and "platform" in str(e).lower() and not os.environ.get("CI"):
        pytest.skip(f"CUDA lowering unavailable (run make test): {e}")


def cuda_kernels(f, *args):
    """Names of the jaxquant kernels in ``f``'s program lowered for CUDA (works on a CPU machine), in order."""
    try:
        hlo = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # pragma: no cover - a machine without jax-cuda12-plugin
        skip_without_cuda_lowering(e)
        raise
    # Triton calls carry their name; a Mosaic GPU call carries it inside its serialized module
    pattern = r'name = "(jaxquant_\w+)"|custom_call @mosaic_gpu\w*\([^\n]*?(jaxquant_\w+?)\\00'
    return [a or re.sub(r"_\d+$", "", b) for a, b in re.findall(pattern, hlo)]
