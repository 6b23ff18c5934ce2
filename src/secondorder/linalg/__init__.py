"""Linear operators on arrays and parameter trees, solvers, matrix functions and spectral tools.

Operators act on parameter trees or on their flat coordinates (:mod:`.operator`); ``to_scipy``
hands them to SciPy; ``lanczos`` and ``eigsh`` find extreme eigenvalues; ``hutchinson_trace`` and
``hutchinson_diagonal`` estimate the trace and the diagonal from matrix-vector products."""

from .block import BlockDiagonal
from .cg import REASONS, CGInfo, cg
from .composite import Adjoint, Product, Scaled, Sum
from .dense import Dense
from .diagonal import Diagonal, Identity, ScaledIdentity
from .eigsh import EigshInfo, eigsh
from .hutchinson import hutchinson_diagonal, hutchinson_trace, rademacher
from .kronecker import Kronecker, KroneckerEigen, kron, mode_products
from .lanczos import LanczosResult, lanczos
from .lowrank import LowRank
from .matrix_function import damped_inverse, eigh, inverse_root, matrix_power
from .operator import FunctionOperator, LinearOperator
from .properties import is_symmetric
from .scipy import to_scipy
from .structure import Structure

__all__ = [
    "REASONS",
    "Adjoint",
    "BlockDiagonal",
    "CGInfo",
    "Dense",
    "Diagonal",
    "EigshInfo",
    "FunctionOperator",
    "Identity",
    "Kronecker",
    "KroneckerEigen",
    "LanczosResult",
    "LinearOperator",
    "LowRank",
    "Product",
    "Scaled",
    "ScaledIdentity",
    "Structure",
    "Sum",
    "cg",
    "damped_inverse",
    "eigh",
    "eigsh",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "inverse_root",
    "is_symmetric",
    "kron",
    "lanczos",
    "matrix_power",
    "mode_products",
    "rademacher",
    "to_scipy",
]
