"""Real model shapes, shared by the tests (scaled down on CPU) and the benchmarks.

Linear layers are ``(N, K)`` = (output features, input features) of Llama-like models
(docs/performance.md): 4096x4096 (attention projections of 7-8B models), 14336x4096 (MLP up/gate of
Llama-3-8B), 4096x14336 (MLP down), 8192x8192 (70B-class attention), plus a ragged one.
"""

from __future__ import annotations

# (N, K) of linear layers: weights [N, K], y = x @ W^T.
LINEAR_NK = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]
RAGGED_NK = [(11008, 4000)]
# Token counts M (batch * sequence) from decode to prefill.
TOKENS_M = [1, 16, 128, 512, 2048, 8192]
RAGGED_M = [1000]

# Activations [tokens, hidden] for the elementwise quantize family; >= 256 MB in bf16 at the top.
ACTIVATIONS = [(65536, 8192), (16384, 14336), (8192, 4096)]
GROUP_SIZES = [32, 64, 128, 256]

# Small shapes with ragged edges for CPU tests (not multiples of any block size).
SMALL_RAGGED = [(3, 5, 64), (37, 96), (7, 130), (1, 1000), (129, 256)]
