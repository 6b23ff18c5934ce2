"""``DenseBlock``: K-FAC's curvature block of a dense layer (Martens and Grosse, 2015)."""

from __future__ import annotations

from .kronecker import KroneckerBlock


class DenseBlock(KroneckerBlock):
    """K-FAC block of a dense layer s = W a + b: F ~ A (x) G (J. Martens and R. Grosse,
    "Optimizing neural networks with Kronecker-factored approximate curvature", ICML 2015), with

        A = E[a~ a~^T],  a~ = (a, 1) (the bias column last),    G = E[delta delta^T],

    delta = dL/ds the output gradients for the cotangents of the chosen curvature (exact GGN,
    Monte-Carlo Fisher or empirical Fisher). In K-FAC's column-major notation the block acts on
    W~ = [W b] as vec(G W~ A); here it is ``Kronecker(G, A)`` on the row-major W~, and the
    state's factors are ``(G, A)``. The damped inverse with the pi-split (``update_cache``'s
    default) is (A + pi sqrt(lambda) I)^{-1} (x) (G + sqrt(lambda)/pi I)^{-1},
    pi = sqrt((tr A / dim A) / (tr G / dim G)).

    A dense layer applied at T positions with one weight (a sequence's tokens, the pixels of an
    image: ``nn.Linear`` on (m, T, d_in)) is a convolution with a 1 x 1 kernel, and its block
    follows :class:`~.conv.ConvBlock`'s convention: A sums over the positions, G averages (the
    "expand" setting of Eschenhagen et al., NeurIPS 2023, of which KFC is an instance).

    Parameters: ``weight_shape`` (d_out, d_in); ``bias`` (default True). Batch statistics take the
    tapped inputs (m, d_in + 1) or (m, T, d_in + 1) and one or several (m, d_out) or
    (m, T, d_out) output gradients.
    """

    input_ndims = (2, 3)
