"""Linear operators on arrays and parameter trees, solvers and matrix functions."""

from .block import BlockDiagonal
from .cg import REASONS, CGInfo, cg
from .composite import Adjoint, Product, Scaled, Sum
from .dense import Dense
from .diagonal import Diagonal, Identity, ScaledIdentity
from .kronecker import Kronecker, KroneckerEigen, kron, mode_products
from .lowrank import LowRank
from .matrix_function import damped_inverse, eigh, inverse_root, matrix_power
from .operator import FunctionOperator, LinearOperator
from .properties import is_symmetric
from .structure import Structure

__all__ = [
    "REASONS",
    "Adjoint",
    "BlockDiagonal",
    "CGInfo",
    "Dense",
    "Diagonal",
    "FunctionOperator",
    "Identity",
    "Kronecker",
    "KroneckerEigen",
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
    "inverse_root",
    "is_symmetric",
    "kron",
    "matrix_power",
    "mode_products",
]
