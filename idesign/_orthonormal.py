"""Orthonormality of a basis, checked to a tolerance derived from how much of an update it may leak.

Shared by :class:`idesign.subspaces.Subspace` and :class:`idesign.hooks.Ablate` (``hooks`` sits below
``subspaces``, so the check lives here).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


#: The most of an update that projecting out of a concrete basis may leave inside its span, per step.
MAX_LEAK = 1e-6


def _leak_bound(e: float) -> float:
    """Worst-case share of an update left inside ``span(B)`` after ``u - Bᵀ B u``, given ``e = ‖B Bᵀ - I‖₂``.

    With ``G = B Bᵀ = I + E`` the true projector onto the span is ``P = Bᵀ G⁻¹ B``, and the projected
    update ``u' = u - Bᵀ B u`` keeps ``B u' = (I - G) B u = -E B u``. Because ``G^{-1/2} B`` has
    orthonormal rows, ``‖P u'‖ = ‖G^{-1/2} E B u‖ ≤ e · ‖G^{-1/2}‖ · ‖B‖ · ‖u‖ = e · sqrt((1 + e) / (1 - e)) · ‖u‖``.
    The same bound holds for :meth:`Subspace.remove` and ``hooks.Ablate`` on activations.
    """
    return math.inf if e >= 1 else e * math.sqrt((1 + e) / (1 - e))


#: Largest allowed spectral deviation ``‖B Bᵀ - I‖₂`` of a concrete basis, for every dtype: the largest
#: ``e`` with ``_leak_bound(e) ≤ MAX_LEAK`` (``e · sqrt((1+e)/(1-e)) ≈ e(1 + e)``, so ``e = MAX_LEAK / (1 + MAX_LEAK)``
#: is just inside). The spectral norm, not the largest entry: ``max |E_ij|`` can understate ``‖E‖₂`` by a
#: factor ``k``. A float32 basis rounded from an exactly orthonormal float64 one deviates by ~3e-8
#: (measured for d up to 4096, k up to 256); bfloat16 and float16 bases cannot meet it unless exact (keep
#: bases in float32: the projection computes in float32 anyway).
ORTHONORMAL_TOL: float = MAX_LEAK / (1 + MAX_LEAK)


def orthonormality_error(basis: Any) -> float:
    """``‖B Bᵀ - I‖₂`` (spectral norm, computed in float64) of a concrete basis ``[k, d]``; 0 for ``k = 0``.

    >>> import numpy as np, idesign as ids
    >>> ids.subspaces.orthonormality_error(np.eye(3)[:2])
    0.0
    >>> round(ids.subspaces.orthonormality_error(np.array([[1., 1.]])), 6)
    1.0
    """
    b = np.asarray(basis, np.float64)
    if b.shape[0] == 0:
        return 0.0
    return float(np.abs(np.linalg.eigvalsh(b @ b.T - np.eye(b.shape[0]))).max())


def check_orthonormal(basis: Any, what: str) -> None:
    """Raises ``ValueError`` naming ``what`` if a concrete basis's rows are not orthonormal to :data:`ORTHONORMAL_TOL`
    (so that projecting out of it leaks at most :data:`MAX_LEAK` of an update). Traced bases are not checked.

    >>> import numpy as np, idesign as ids
    >>> ids.subspaces.check_orthonormal(np.array([[1., 1e-3]]), 'my basis')
    Traceback (most recent call last):
    ...
    ValueError: my basis: basis rows are not orthonormal (‖B Bᵀ - I‖₂ = 1e-06, tolerance 1e-06, which bounds the share of an update left inside the subspace per step at 1e-06). Use Subspace.orthonormalized(vectors) to orthonormalise arbitrary vectors.
    """
    if not (not isinstance(basis, jax.core.Tracer) and isinstance(basis, (np.ndarray, jax.Array))) or np.shape(basis)[0] == 0:
        return
    dev = orthonormality_error(basis)
    if not dev <= ORTHONORMAL_TOL:
        raise ValueError(
            f"{what}: basis rows are not orthonormal (‖B Bᵀ - I‖₂ = {dev:.3g}, tolerance {ORTHONORMAL_TOL:.3g}, "
            f"which bounds the share of an update left inside the subspace per step at {MAX_LEAK:g}). Use "
            "Subspace.orthonormalized(vectors) to orthonormalise arbitrary vectors.")


__all__ = ["MAX_LEAK", "ORTHONORMAL_TOL", "orthonormality_error", "check_orthonormal"]
