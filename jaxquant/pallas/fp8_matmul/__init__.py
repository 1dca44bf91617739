"""fp8 GEMMs ``y = epilogue(A_fp8 @ W_fp8^T)`` with per-row / per-channel or 128-block scales.

``triton``: Pallas Triton (every shape; decode with split K). ``mosaic``: Pallas Mosaic GPU on Hopper
(prefill, warp-specialised TMA-fed ``wgmma``). ``oracle``: the float64 reference and its error bound.
"""
