"""Named JAX primitives (abstract eval, per-platform lowering, batching) and the public custom_vjp functions."""
