"""A model over cfDNA fragment sets: :func:`featurize` (fragment features) and :class:`FragmentSetModel`,
a Flax NNX deep-sets / attention-pooling model giving a sample embedding and a disease logit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idesign.studies.cfdna._cohort import MOTIFS, Cohort, CohortConfig, make_cohort  # noqa: F401 - doctest names

LENGTH_PERIODS: tuple[float, ...] = (10.0, 20.0, 40.0, 80.0, 160.0)
N_CONTINUOUS = 1 + 2 * len(LENGTH_PERIODS) + 2  # length, its Fourier features, methylation, GC
FIELD_COLUMNS = {"length": slice(0, 1 + 2 * len(LENGTH_PERIODS)), "methylation": slice(N_CONTINUOUS - 2, N_CONTINUOUS - 1),
                 "gc": slice(N_CONTINUOUS - 1, N_CONTINUOUS)}


def featurize(cohort: Cohort) -> dict[str, np.ndarray]:
    """Model inputs: ``continuous [N, F, C]`` (length, its Fourier features, methylation, GC),
    ``motifs [N, F]`` and ``weights [N, F]`` (1.0 for real fragments, 0.0 for padding).

    Lengths get sine/cosine features at periods :data:`LENGTH_PERIODS` so that a small model can
    see both thresholds and the 10 bp periodicity. Columns per field are :data:`FIELD_COLUMNS`.

    >>> inputs = featurize(make_cohort(CohortConfig(n_samples=4, min_fragments=8, max_fragments=16), seed=0))
    >>> inputs["continuous"].shape, inputs["weights"].dtype.name
    ((4, 16, 13), 'float32')
    """
    length = cohort.lengths.astype(np.float32)
    phase = 2 * np.pi * length[..., None] / np.asarray(LENGTH_PERIODS, np.float32)
    cont = np.concatenate([((length - 167.0) / 50.0)[..., None], np.sin(phase), np.cos(phase),
                           ((cohort.methylation - 0.7) * 10.0)[..., None], ((cohort.gc - 0.42) * 20.0)[..., None]], -1)
    w = cohort.mask.astype(np.float32)
    return {"continuous": (cont * w[..., None]).astype(np.float32), "motifs": cohort.motifs.astype(np.int32),
            "weights": w}


class FragmentSetModel(nnx.Module):
    """A permutation-invariant model over a sample's fragments: ``(logit [N], embedding [N, E])``.

    Each fragment is encoded by a two-layer MLP ``phi`` (on its continuous features and a learned
    motif embedding); fragments are pooled by their ``weights`` (masked mean, or attention: a
    learned score per fragment, softmax over real fragments); ``rho`` maps the pooled vector to the
    sample **embedding**, and a linear ``head`` reads the disease **logit** from it, so the logit's
    direction in embedding space is ``head.kernel``. ``weights`` are floats so that the logit can be
    differentiated with respect to each fragment's presence (attribution).

    Args:
      d_hidden: width of ``phi``; d_embed: embedding size; d_motif: motif-embedding size.
      pooling: ``"mean"`` (deep sets) or ``"attention"``.
      rngs: ``nnx.Rngs``.

    Example:
      >>> from flax import nnx
      >>> from idesign.studies import cfdna
      >>> inputs = cfdna.featurize(cfdna.make_cohort(cfdna.CohortConfig(n_samples=3, min_fragments=4, max_fragments=8), seed=0))
      >>> model = cfdna.FragmentSetModel(d_hidden=8, d_embed=4, rngs=nnx.Rngs(0))
      >>> logit, emb = model(inputs["continuous"], inputs["motifs"], inputs["weights"])
      >>> logit.shape, emb.shape
      ((3,), (3, 4))
    """

    def __init__(self, *, d_hidden: int = 32, d_embed: int = 16, d_motif: int = 4, pooling: str = "mean",
                 rngs: nnx.Rngs):
        if pooling not in ("mean", "attention"):
            raise ValueError(f"FragmentSetModel: pooling must be 'mean' or 'attention', got {pooling!r}.")
        self.pooling = pooling
        self.motif_embed = nnx.Embed(len(MOTIFS), d_motif, rngs=rngs)
        self.phi1 = nnx.Linear(N_CONTINUOUS + d_motif, d_hidden, rngs=rngs)
        self.phi2 = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
        if pooling == "attention":
            self.attn = nnx.Linear(d_hidden, 1, rngs=rngs)
        self.rho = nnx.Linear(d_hidden, d_embed, rngs=rngs)
        self.head = nnx.Linear(d_embed, 1, rngs=rngs)

    def __call__(self, continuous: jax.Array, motifs: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jnp.concatenate([continuous, self.motif_embed(motifs)], axis=-1)
        h = nnx.gelu(self.phi2(nnx.gelu(self.phi1(x))))
        if self.pooling == "attention":
            # Fragment weights enter as log-weights, so weight 0 is excluded and d/dw still exists.
            scores = self.attn(h)[..., 0] + jnp.log(jnp.maximum(weights, 1e-30))
            alpha = jax.nn.softmax(jnp.where(weights > 0, scores, -jnp.inf), axis=-1)
            pooled = jnp.einsum("nf,nfd->nd", alpha, h)
        else:
            pooled = jnp.einsum("nf,nfd->nd", weights, h) / jnp.maximum(weights.sum(-1, keepdims=True), 1e-6)
        embedding = nnx.gelu(self.rho(pooled))
        return self.head(embedding)[..., 0], embedding
