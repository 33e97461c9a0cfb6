"""matfn: matrix functions for matrix-function optimizers.

Polar factor (``msign``), matrix sign (``mcsgn``), singular-value clipping (``mclip``), the
derivative of msign through Sylvester equations, and the O(n²) inverse of diagonal-plus-low-rank
triangular matrices. Torch tensors in and out, any leading batch dims, CPU or CUDA (fused Triton
kernels behind the same call on CUDA).
"""

from .coefficients import polar_express_coefficients
from .derivatives import msign_jvp, msign_vjp
from .mclip import mclip
from .mcsgn import MatrixSignConvergenceError, mcsgn
from .msign import msign
from .sylvester import SylvesterSolveError, solve_sylvester
from .triangular import tri_inv, tri_inv_chunks, tri_solve

__version__ = "0.1.0"

__all__ = [
    "msign",
    "mcsgn",
    "mclip",
    "MatrixSignConvergenceError",
    "SylvesterSolveError",
    "polar_express_coefficients",
    "solve_sylvester",
    "msign_jvp",
    "msign_vjp",
    "tri_inv",
    "tri_inv_chunks",
    "tri_solve",
]
