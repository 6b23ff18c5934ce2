"""``ConvBlock``: the KFC curvature block of a 2-D convolution (Grosse and Martens, 2016)."""

from __future__ import annotations

from .kronecker import KroneckerBlock


class ConvBlock(KroneckerBlock):
    """KFC block of a convolution with kernel (C_out, C_in, kh, kw) (Grosse and Martens,
    ICML 2016, "KFC": im2col patches with a homogeneous 1, spatial sums / means):

        A = (1/m) sum_i sum_t a~_it a~_it^T,    G = (1/(m T)) sum_i sum_t delta_it delta_it^T,

    a~_it the homogeneous patch of example i at output position t (C_in kh kw + 1 entries,
    channel-major as the kernel flattened row-major), delta_it the output gradient there, T the
    number of output positions. Convention: **A sums over positions, G averages** (as
    :func:`secondorder.curvature.kronecker_factors`); curvlinops' factors are (A / T, T G). The
    product A (x) G is the same, and so is the pi-split damped inverse (pi scales with
    sqrt(tr A / tr G), so (A/T + pi/T sqrt(l) I) (x) (T G + T sqrt(l)/pi I) is the same matrix);
    only a split that ignores the traces ("equal") differs. To reproduce the other convention,
    pass factors scaled by (1/T, T) to ``with_factors`` or ``update_statistics``.
    The block acts on the kernel flattened to (C_out, C_in kh kw) with the bias column last,
    ``Kronecker(G, A)``, as :class:`~.dense.DenseBlock` does.

    Parameters: ``weight_shape`` (C_out, C_in, kh, kw); ``bias`` (default True). Batch statistics
    take the tapped patches (m, T, C_in kh kw + 1) and one or several (m, T, C_out) output
    gradients.
    """

    input_ndims = (3,)
