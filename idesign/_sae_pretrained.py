"""Pretrained SAEs (SAELens directories, Gemma Scope ``params.npz``) and the SAE splice intervention.

Re-exported by :mod:`idesign.sae`: ``ids.sae.SAE``, ``ids.sae.load_saelens``, ``ids.sae.load_gemma_scope``,
``ids.sae.Splice``.

One pytree class, :class:`SAE`, holds every supported architecture; ``architecture`` and the options that change
the formula are static fields, the weights are leaves. Each architecture computes exactly what its source
computes (SAELens' ``encode``/``decode``; Gemma Scope's reference implementation)::

    x' = normalize(x) - b_dec * apply_b_dec_to_input
    standard   f = relu(x' W_enc + b_enc)
    jumprelu   f = (pre > threshold) * relu(pre),  pre = x' W_enc + b_enc      (= (pre > θ)·pre when θ >= 0)
    topk       f = relu of the k largest entries of pre, zero elsewhere
    gated      f = (x' W_enc + b_gate > 0) * relu(x' (W_enc * exp(r_mag)) + b_mag)
    x_hat      = denormalize((f * scaling) W_dec + b_dec)

``normalize`` is the identity unless ``normalize_activations`` is ``"constant_norm_rescale"`` (scale each input
to norm ``sqrt(d_in)``) or ``"layer_norm"`` (subtract the mean, divide by the standard deviation + 1e-5); both
are undone after decoding, which is why :meth:`SAE.decode` takes the input ``x`` for them.
``"expected_average_only_in"`` is the identity at inference, as in SAELens, whose dataset-level factor is
folded into the weights when an SAE is saved. ``scaling`` is the pre-6.0 ``finetuning_scaling_factor``.

**Splice.** :class:`Splice` replaces a site's activation by the SAE's reconstruction, and with ``error=True``
adds the SAE's error ``x - x_hat`` back, so the forward pass is unchanged until a feature is edited. It opens two
sites inside the one it is hooked at, ``<site>.sae.features`` (``[..., d_sae]``) and ``<site>.sae.error``
(``[..., d_in]``), which every hook can use: capture them (``collect_activations`` and probes), steer them
(:class:`idesign.hooks.Add`), ablate them (:class:`idesign.hooks.Ablate`, CAFT).

>>> import jax.numpy as jnp, idesign as ids
>>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
>>> sae = ids.sae.SAE(w_enc=jnp.eye(8, 16), b_enc=jnp.zeros(16), w_dec=jnp.eye(16, 8), b_dec=jnp.zeros(8))
>>> tokens = jnp.ones((1, 3), jnp.int32)
>>> hooks = {'blocks.0.resid_post': ids.sae.Splice(sae, error=True),
...          'blocks.0.resid_post.sae.features': ids.Capture()}
>>> logits, captured = apply(params, tokens, hooks=hooks)
>>> captured['blocks.0.resid_post.sae.features'].shape, bool((logits == apply(params, tokens)[0]).all())
((1, 3, 16), True)
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idesign._pytree import pytree_class, static
from idesign._types import Array
from idesign.hooks import Intervention, SiteRunner

ARCHITECTURES = ("standard", "gated", "jumprelu", "topk")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_LAYER_NORM_EPS = 1e-5  # SAELens' run_time_activation_ln_in


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


@pytree_class
class SAE:
    """A sparse autoencoder of any supported architecture (see the module docstring for the formulas).

    Attributes:
      w_enc: ``[d_in, d_sae]`` encoder; b_enc: ``[d_sae]`` encoder bias (``None`` for ``gated``).
      w_dec: ``[d_sae, d_in]`` decoder (row ``m`` is feature ``m``'s direction); b_dec: ``[d_in]`` decoder bias.
      threshold: ``[d_sae]`` JumpReLU thresholds (``jumprelu`` only).
      b_gate, r_mag, b_mag: ``[d_sae]`` gated-SAE parameters (``gated`` only).
      scaling: optional ``[d_sae]`` factor applied to the features before decoding (SAELens < 6
        ``finetuning_scaling_factor``).
      architecture: ``"standard"``, ``"jumprelu"``, ``"topk"`` or ``"gated"`` (static).
      k: active features of a ``topk`` SAE (static).
      apply_b_dec_to_input: subtract ``b_dec`` before encoding (static; SAELens' default True, Gemma Scope False).
      normalize_activations: one of :data:`NORMALIZATIONS` (static).
      hook_name: where the SAE was trained, as its source names it (static metadata, e.g.
        ``blocks.8.hook_resid_pre``); not used in any computation.

    >>> import jax.numpy as jnp
    >>> s = SAE(w_enc=jnp.eye(2), b_enc=jnp.array([0., -1.]), w_dec=2 * jnp.eye(2), b_dec=jnp.zeros(2))
    >>> s.encode(jnp.array([3., 0.5])).tolist(), s.reconstruct(jnp.array([3., 0.5])).tolist()
    ([3.0, 0.0], [6.0, 0.0])
    """

    w_enc: Array
    b_enc: Array | None
    w_dec: Array
    b_dec: Array
    threshold: Array | None = None
    b_gate: Array | None = None
    r_mag: Array | None = None
    b_mag: Array | None = None
    scaling: Array | None = None
    architecture: str = static(default="standard")
    k: int | None = static(default=None)
    apply_b_dec_to_input: bool = static(default=True)
    normalize_activations: str = static(default="none")
    hook_name: str | None = static(default=None)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAE: architecture {self.architecture!r} is not supported; supported: {list(ARCHITECTURES)}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"SAE: normalize_activations {self.normalize_activations!r} is not supported; "
                             f"supported: {list(NORMALIZATIONS)}.")
        if jnp.ndim(self.w_enc) != 2 or jnp.ndim(self.w_dec) != 2:
            raise ValueError(f"SAE: w_enc must be [d_in, d_sae] and w_dec [d_sae, d_in]; got shapes "
                             f"{tuple(jnp.shape(self.w_enc))} and {tuple(jnp.shape(self.w_dec))}.")
        d_in, d_sae = jnp.shape(self.w_enc)
        expected = {"w_dec": (d_sae, d_in), "b_dec": (d_in,), "b_enc": (d_sae,), "threshold": (d_sae,),
                    "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,), "scaling": (d_sae,)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(jnp.shape(value)) != shape:
                raise ValueError(f"SAE: {name} has shape {tuple(jnp.shape(value))}; w_enc [d_in={d_in}, d_sae={d_sae}] "
                                 f"implies {shape}.")
        needs = {"standard": ("b_enc",), "topk": ("b_enc",), "jumprelu": ("b_enc", "threshold"),
                 "gated": ("b_gate", "r_mag", "b_mag")}[self.architecture]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(f"SAE: a {self.architecture!r} SAE needs {list(needs)}; missing {missing}.")
        if self.architecture == "topk" and not (isinstance(self.k, (int, np.integer)) and 1 <= self.k <= d_sae):
            raise ValueError(f"SAE: a 'topk' SAE needs an integer k in [1, d_sae={d_sae}]; got k={self.k!r}.")

    # --------------------------------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads.

        >>> import jax.numpy as jnp
        >>> SAE(w_enc=jnp.zeros((3, 5)), b_enc=jnp.zeros(5), w_dec=jnp.zeros((5, 3)), b_dec=jnp.zeros(3)).d_in
        3
        """
        return int(jnp.shape(self.w_enc)[0])

    @property
    def d_sae(self) -> int:
        """Number of features.

        >>> import jax.numpy as jnp
        >>> SAE(w_enc=jnp.zeros((3, 5)), b_enc=jnp.zeros(5), w_dec=jnp.zeros((5, 3)), b_dec=jnp.zeros(3)).d_sae
        5
        """
        return int(jnp.shape(self.w_enc)[1])

    @classmethod
    def topk(cls, w_enc: Any, b_enc: Any, w_dec: Any, b_dec: Any, *, k: int, **kwargs: Any) -> "SAE":
        """A TopK SAE (``apply_b_dec_to_input=True``), as :mod:`idesign.sae` trains them.

        >>> import jax.numpy as jnp
        >>> SAE.topk(jnp.eye(3), jnp.zeros(3), jnp.eye(3), jnp.zeros(3), k=1).encode(jnp.array([1., 3., 2.])).tolist()
        [0.0, 3.0, 0.0]
        """
        return cls(w_enc=jnp.asarray(w_enc), b_enc=jnp.asarray(b_enc), w_dec=jnp.asarray(w_dec),
                   b_dec=jnp.asarray(b_dec), architecture="topk", k=int(k), **kwargs)

    @classmethod
    def from_params(cls, params: Any, k: int) -> "SAE":
        """The :class:`SAE` of an :class:`idesign.sae.SAEParams` trained by :func:`idesign.sae.train_sae`.

        >>> import jax.numpy as jnp
        >>> from idesign import sae
        >>> p = sae.SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.ones(2))
        >>> SAE.from_params(p, k=1).encode(jnp.array([3., 1.])).tolist()
        [2.0, 0.0]
        """
        return cls.topk(params.w_enc, params.b_enc, params.w_dec, params.b_dec, k=k)

    # --------------------------------------------------------------------------------------------------------

    def _normalize(self, x: Array) -> Array:
        if self.normalize_activations == "constant_norm_rescale":
            return x * (self.d_in ** 0.5 / jnp.linalg.norm(x, axis=-1, keepdims=True))
        if self.normalize_activations == "layer_norm":
            centred = x - x.mean(-1, keepdims=True)
            return centred / (jnp.std(centred, axis=-1, ddof=1, keepdims=True) + _LAYER_NORM_EPS)
        return x

    def _denormalize(self, y: Array, x: Array | None) -> Array:
        if self.normalize_activations not in ("constant_norm_rescale", "layer_norm"):
            return y
        if x is None:
            raise ValueError(f"SAE.decode: this SAE normalises each input ({self.normalize_activations!r}); pass the "
                             "input the features were encoded from, decode(features, x), to undo it.")
        x = jnp.asarray(x, self.w_dec.dtype)
        if self.normalize_activations == "constant_norm_rescale":
            return y / (self.d_in ** 0.5 / jnp.linalg.norm(x, axis=-1, keepdims=True))
        mu = x.mean(-1, keepdims=True)
        return y * jnp.std(x - mu, axis=-1, ddof=1, keepdims=True) + mu

    def pre_activations(self, x: Any) -> Array:
        """``x' W_enc + b_enc`` (the magnitude path ``x' (W_enc * exp(r_mag)) + b_mag`` for gated SAEs).

        >>> import jax.numpy as jnp
        >>> SAE(w_enc=jnp.eye(2), b_enc=jnp.ones(2), w_dec=jnp.eye(2), b_dec=jnp.ones(2)).pre_activations(jnp.ones(2)).tolist()
        [1.0, 1.0]
        """
        x = self._check_input(x, "pre_activations")
        sae_in = self._normalize(x) - self.b_dec * self.apply_b_dec_to_input
        if self.architecture == "gated":
            return sae_in @ (self.w_enc * jnp.exp(self.r_mag)) + self.b_mag
        return sae_in @ self.w_enc + self.b_enc

    def encode(self, x: Any) -> Array:
        """Features ``[..., d_sae]`` of activations ``[..., d_in]`` (computed in the SAE's dtype).

        >>> import jax.numpy as jnp
        >>> s = SAE(w_enc=jnp.eye(2), b_enc=jnp.zeros(2), w_dec=jnp.eye(2), b_dec=jnp.zeros(2),
        ...         threshold=jnp.array([1., 1.]), architecture='jumprelu', apply_b_dec_to_input=False)
        >>> s.encode(jnp.array([2., 0.5])).tolist()
        [2.0, 0.0]
        """
        x = self._check_input(x, "encode")
        sae_in = self._normalize(x) - self.b_dec * self.apply_b_dec_to_input
        if self.architecture == "gated":
            gate = (sae_in @ self.w_enc + self.b_gate) > 0
            magnitude = jax.nn.relu(sae_in @ (self.w_enc * jnp.exp(self.r_mag)) + self.b_mag)
            return jnp.where(gate, magnitude, 0).astype(magnitude.dtype)
        pre = sae_in @ self.w_enc + self.b_enc
        if self.architecture == "standard":
            return jax.nn.relu(pre)
        if self.architecture == "jumprelu":
            return jnp.where(pre > self.threshold, jax.nn.relu(pre), 0).astype(pre.dtype)
        # topk: exactly k entries kept (ties broken by index, as torch.topk), rectified
        values, index = jax.lax.top_k(pre, self.k)
        return jnp.put_along_axis(jnp.zeros_like(pre), index, jax.nn.relu(values), axis=-1, inplace=False)

    def decode(self, features: Any, x: Any = None) -> Array:
        """Reconstruction ``[..., d_in]`` of features ``[..., d_sae]``.

        Args:
          features: the features (edited or not).
          x: the input they were encoded from; needed only when ``normalize_activations`` rescales each input
            (``"constant_norm_rescale"``, ``"layer_norm"``), to undo it.

        >>> import jax.numpy as jnp
        >>> SAE(w_enc=jnp.eye(2), b_enc=jnp.zeros(2), w_dec=2 * jnp.eye(2), b_dec=jnp.ones(2)).decode(jnp.array([1., 0.])).tolist()
        [3.0, 1.0]
        """
        f = jnp.asarray(features, self.w_dec.dtype)
        if f.shape[-1:] != (self.d_sae,):
            raise ValueError(f"SAE.decode: features have shape {tuple(f.shape)}; expected [..., d_sae={self.d_sae}].")
        if self.scaling is not None:
            f = f * self.scaling
        return self._denormalize(f @ self.w_dec + self.b_dec, x)

    def reconstruct(self, x: Any) -> Array:
        """``decode(encode(x), x)``.

        >>> import jax.numpy as jnp
        >>> SAE(w_enc=jnp.eye(2), b_enc=jnp.zeros(2), w_dec=jnp.eye(2), b_dec=jnp.zeros(2)).reconstruct(jnp.array([3., -1.])).tolist()
        [3.0, 0.0]
        """
        return self.decode(self.encode(x), x)

    def _check_input(self, x: Any, fn: str) -> Array:
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.d_in,):
            raise ValueError(f"SAE.{fn}: activations have shape {tuple(x.shape)}; this SAE reads [..., d_in={self.d_in}].")
        return x.astype(self.w_enc.dtype)

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.architecture == "topk" else ""
        hook = f", hook_name={self.hook_name!r}" if self.hook_name else ""
        return (f"SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{extra}, "
                f"dtype={jnp.result_type(self.w_enc)}{hook})")


# ------------------------------------------------------------------------------------------------------------
# The splice.


@pytree_class
class Splice(Intervention):
    """Replaces a site's activation ``x`` by the SAE reconstruction ``x_hat`` (plus the error with ``error=True``).

    Opens ``<site>.sae.features`` and ``<site>.sae.error`` as sites (see the module docstring). With
    ``error=True`` the output is ``x + (decode(f') - decode(f)) + (e' - e)``, where ``f``, ``e`` are the clean
    features and error and ``f'``, ``e'`` what the hooks at the two sub-sites made of them: exactly ``x``
    when nothing edits them (the forward pass is unchanged, bit for bit), and ``decode(f') + e'`` otherwise.
    With ``error=False`` it is ``decode(f')`` (the SAE's own reconstruction, its error dropped).

    Args:
      sae: an :class:`SAE` whose ``d_in`` is the site's width.
      error: add the error term back.

    Raises:
      ValueError: (when traced) the SAE's ``d_in`` differs from the site's width; the message names both.

    >>> import jax.numpy as jnp, idesign as ids
    >>> s = SAE(w_enc=jnp.eye(2), b_enc=jnp.zeros(2), w_dec=jnp.eye(2), b_dec=jnp.zeros(2))
    >>> Splice(s).apply('x', jnp.array([3., -1.])).tolist(), Splice(s, error=True).apply('x', jnp.array([3., -1.])).tolist()
    ([3.0, 0.0], [3.0, -1.0])
    """

    sae: SAE
    error: bool = static(default=False)

    def __post_init__(self):
        if not isinstance(self.sae, SAE):
            raise TypeError(f"Splice: sae must be an idesign.sae.SAE (load one with ids.sae.load_saelens / "
                            f"load_gemma_scope, or SAE.from_params for a trained TopK SAE); got {type(self.sae).__name__}.")

    def sub_sites(self, site: str) -> tuple[str, ...]:
        """The two sites the splice opens inside ``site``: its features and its error.

        >>> import jax.numpy as jnp
        >>> s = SAE(w_enc=jnp.eye(2), b_enc=jnp.zeros(2), w_dec=jnp.eye(2), b_dec=jnp.zeros(2))
        >>> Splice(s).sub_sites('blocks.3.resid_post')
        ('blocks.3.resid_post.sae.features', 'blocks.3.resid_post.sae.error')
        """
        return (f"{site}.sae.features", f"{site}.sae.error")

    def apply(self, site: str, h: Array) -> Array:
        """The splice with no hooks at its sub-sites: ``x_hat`` (``error=False``) or ``h`` itself (``error=True``).

        >>> import jax.numpy as jnp
        >>> s = SAE(w_enc=jnp.eye(2), b_enc=jnp.array([0., -1.]), w_dec=jnp.eye(2), b_dec=jnp.zeros(2))
        >>> Splice(s).apply('x', jnp.array([3., 0.5])).tolist(), Splice(s, error=True).apply('x', jnp.array([3., 0.5])).tolist()
        ([3.0, 0.0], [3.0, 0.5])
        """
        return self.apply_in(site, h, None)

    def apply_in(self, site: str, h: Array, sites: SiteRunner | None) -> Array:
        """The splice, running ``sites`` (the hooks' runner) at ``<site>.sae.features`` and ``<site>.sae.error``.

        Models call this; ``sites`` is any callable ``(name, value) -> value`` (``None``: nothing runs there).

        >>> import jax.numpy as jnp
        >>> s = SAE(w_enc=jnp.eye(2), b_enc=jnp.zeros(2), w_dec=jnp.eye(2), b_dec=jnp.zeros(2))
        >>> zero_feature_0 = lambda name, v: v.at[0].set(0.0) if name.endswith('.features') else v
        >>> Splice(s, error=True).apply_in('x', jnp.array([3., 2.]), zero_feature_0).tolist()
        [0.0, 2.0]
        """
        if h.shape[-1] != self.sae.d_in:
            raise ValueError(
                f"Splice at site {site!r}: the SAE reads d_in={self.sae.d_in} but the site's activation has width "
                f"{h.shape[-1]} (shape {tuple(h.shape)})"
                + (f"; the SAE was trained at {self.sae.hook_name!r}" if self.sae.hook_name else "")
                + ". Use an SAE trained on this site.")
        run = (lambda name, v: v) if sites is None else sites
        features = self.sae.encode(h)
        clean = self.sae.decode(features, h)
        error = h.astype(clean.dtype) - clean
        edited = run(f"{site}.sae.features", features)
        error_edited = run(f"{site}.sae.error", error)
        if not self.error:
            return self.sae.decode(edited, h).astype(h.dtype)
        delta = (self.sae.decode(edited, h) - clean) + (error_edited - error)
        return h + delta.astype(h.dtype)


# ------------------------------------------------------------------------------------------------------------
# Loaders.

_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "float16": jnp.float16, "half": jnp.float16,
           "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def _dtype(name: Any, where: str) -> Any:
    if name is None:
        return None
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"{where}: dtype {name!r} is not supported; supported: {sorted(_DTYPES)}.")
    return _DTYPES[key]


def _cfg_field(cfg: Mapping[str, Any], name: str, path: pathlib.Path, what: str) -> Any:
    if name not in cfg:
        raise ValueError(f"load_saelens: {path} has no field {name!r} ({what}); its fields are {sorted(cfg)}.")
    return cfg[name]


def _saelens_config(cfg: Mapping[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """Reads the fields that change the formula, from SAELens >= 6 or pre-6.0 configs."""
    d_in = _cfg_field(cfg, "d_in", path, "the width of the activations the SAE reads")
    d_sae = _cfg_field(cfg, "d_sae", path, "the number of features")
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"load_saelens: {path} field {name!r} = {value!r}; expected a positive integer.")
    # pre-6.0 spelled the activation `activation_fn_str` and made TopK a 'standard' SAE with activation 'topk'
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    architecture = cfg.get("architecture", "standard") or "standard"
    if activation == "topk":
        architecture = "topk"
    elif activation != "relu":
        raise ValueError(f"load_saelens: {path} field 'activation_fn' = {activation!r} is not supported; "
                         "supported: 'relu' (and 'topk').")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"load_saelens: {path} field 'architecture' = {architecture!r} is not supported; "
                         f"supported: {list(ARCHITECTURES)}.")
    k = None
    if architecture == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if k is None:
            raise ValueError(f"load_saelens: {path} describes a TopK SAE but has no field 'k' (nor "
                             "'activation_fn_kwargs': {'k': ...}); its fields are " f"{sorted(cfg)}.")
        if float(k) != int(k):
            raise ValueError(f"load_saelens: {path} field 'k' = {k!r}; expected an integer.")
        k = int(k)
    normalize = cfg.get("normalize_activations", "none")
    if isinstance(normalize, bool):  # pre-6.0: a bool meaning the April-update scaling
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = "none" if normalize is None else normalize
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"load_saelens: {path} field 'normalize_activations' = {normalize!r} is not supported; "
                         f"supported: {list(NORMALIZATIONS)}.")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", None):
        raise ValueError(f"load_saelens: {path} field 'reshape_activations' = {reshape!r} is not supported (only "
                         "'none'); an attention hook_z SAE reads [..., heads * head_dim]: reshape the site yourself.")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"load_saelens: {path} field 'apply_b_dec_to_input' = {apply_b_dec!r}; expected true/false.")
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    hook = cfg.get("hook_name", cfg.get("hook_point", meta.get("hook_name") if isinstance(meta, Mapping) else None))
    return dict(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, normalize_activations=normalize,
                apply_b_dec_to_input=apply_b_dec, hook_name=hook, dtype=cfg.get("dtype"),
                finetuning_scaling_factor=bool(cfg.get("finetuning_scaling_factor", False)))


_NEEDS = {"standard": ("W_enc", "b_enc", "W_dec", "b_dec"), "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
          "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
          "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")}
_FIELD = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
          "b_gate": "b_gate", "r_mag": "r_mag", "b_mag": "b_mag"}


def _build(tensors: dict[str, np.ndarray], architecture: str, d_in: int, d_sae: int, where: str,
           dtype: Any, **static_fields: Any) -> SAE:
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    if "threshold" not in tensors and "log_threshold" in tensors:  # a training checkpoint's parameterisation
        tensors["threshold"] = np.exp(np.asarray(tensors.pop("log_threshold"), np.float32))
    scaling = None
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            value = tensors.pop(name)
            if not np.allclose(np.asarray(value, np.float32), 1.0):  # all ones: a no-op SAELens drops too
                scaling = value
    needs = _NEEDS[architecture]
    missing = [k for k in needs if k not in tensors]
    if missing:
        raise ValueError(f"{where}: a {architecture!r} SAE needs tensors {list(needs)}; missing {missing} "
                         f"(the file has {sorted(tensors)}).")
    extra = sorted(set(tensors) - set(needs))
    if extra:  # a tensor with no place in the formula would be silently wrong numerics
        raise ValueError(f"{where}: tensors {extra} have no place in a {architecture!r} SAE (it uses {list(needs)}).")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name in needs:
        expected = shapes.get(name, (d_sae,))
        if tuple(tensors[name].shape) != expected:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}; d_in={d_in} and "
                             f"d_sae={d_sae} imply {expected}.")
    if scaling is not None and tuple(scaling.shape) != (d_sae,):
        raise ValueError(f"{where}: tensor 'scaling_factor' has shape {tuple(scaling.shape)}; expected ({d_sae},).")
    cast = lambda a: jnp.asarray(a, dtype or a.dtype)
    fields = {_FIELD[name]: cast(tensors[name]) for name in needs}
    fields.setdefault("b_enc", None)
    return SAE(**fields, scaling=None if scaling is None else cast(scaling), architecture=architecture,
               **static_fields)


def load_saelens(path: str | pathlib.Path, *, dtype: Any = None) -> SAE:
    """Loads a SAELens SAE directory: ``cfg.json`` and ``sae_weights.safetensors``.

    Reads SAELens >= 6 configs and the pre-6.0 ones (``activation_fn_str``, TopK as activation ``"topk"``
    with ``activation_fn_kwargs.k``, ``normalize_activations`` as a bool, ``hook_point``), the architectures
    ``standard``, ``jumprelu`` (tensor ``threshold``, or a training checkpoint's ``log_threshold``), ``topk``
    and ``gated``, and the pre-6.0 ``scaling_factor`` tensor.

    Args:
      path: the directory.
      dtype: cast the weights to this dtype (default: the config's ``dtype``, else as stored).

    Returns:
      An :class:`SAE`.

    Raises:
      FileNotFoundError: a missing file. ValueError: a malformed ``cfg.json`` (names the missing or bad
      field), an unsupported architecture, activation or normalisation, a missing, extra or mis-shaped
      tensor (names it and the shape the config implies).

    >>> import json, tempfile, pathlib, numpy as np
    >>> from safetensors.numpy import save_file
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / 'cfg.json').write_text(json.dumps({'d_in': 2, 'd_sae': 3, 'architecture': 'standard'}))
    >>> save_file({'W_enc': np.ones((2, 3), np.float32), 'b_enc': np.zeros(3, np.float32),
    ...            'W_dec': np.ones((3, 2), np.float32), 'b_dec': np.zeros(2, np.float32)}, d / 'sae_weights.safetensors')
    >>> load_saelens(d)
    SAE(standard, d_in=2, d_sae=3, dtype=float32)
    """
    path = pathlib.Path(path)
    cfg_path, weights_path = path / "cfg.json", path / "sae_weights.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_saelens: {p} does not exist; a SAELens SAE directory holds cfg.json and "
                                    "sae_weights.safetensors.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_saelens: {cfg_path} is not valid JSON ({e}).") from e
    if not isinstance(cfg, Mapping):
        raise ValueError(f"load_saelens: {cfg_path} must hold a JSON object; got {type(cfg).__name__}.")
    c = _saelens_config(cfg, cfg_path)
    from safetensors.numpy import load_file
    tensors = load_file(str(weights_path))
    if c["finetuning_scaling_factor"] and not any(k in tensors for k in ("scaling_factor", "finetuning_scaling_factor")):
        raise ValueError(f"load_saelens: {cfg_path} sets finetuning_scaling_factor but {weights_path} has no "
                         "'scaling_factor' tensor.")
    target = _dtype(dtype, "load_saelens") or _dtype(c["dtype"], f"load_saelens: {cfg_path} field 'dtype'")
    return _build(tensors, c["architecture"], c["d_in"], c["d_sae"], f"load_saelens: {weights_path}", target,
                  k=c["k"], apply_b_dec_to_input=c["apply_b_dec_to_input"],
                  normalize_activations=c["normalize_activations"], hook_name=c["hook_name"])


def load_gemma_scope(path: str | pathlib.Path, *, dtype: Any = None, hook_name: str | None = None) -> SAE:
    """Loads a Gemma Scope SAE: ``params.npz`` with ``W_enc, W_dec, b_enc, b_dec, threshold`` (JumpReLU).

    ``f = (pre > threshold) * relu(pre)`` with ``pre = x @ W_enc + b_enc`` (no ``b_dec`` subtracted from the
    input), ``x_hat = f @ W_dec + b_dec``: Gemma Scope's reference implementation. With its thresholds, which
    are positive, this is ``(pre > threshold) * pre``.

    Args:
      path: the ``params.npz`` file, or a directory holding it.
      dtype: cast the weights to this dtype (default: as stored, float32).
      hook_name: optional metadata (where the SAE reads, e.g. ``'blocks.20.resid_post'``).

    >>> import tempfile, pathlib, numpy as np
    >>> f = pathlib.Path(tempfile.mkdtemp()) / 'params.npz'
    >>> np.savez(f, W_enc=np.eye(2, 4, dtype=np.float32), b_enc=np.zeros(4, np.float32), W_dec=np.eye(4, 2, dtype=np.float32),
    ...          b_dec=np.zeros(2, np.float32), threshold=np.full(4, 0.5, np.float32))
    >>> sae = load_gemma_scope(f)
    >>> sae, sae.encode(np.array([1.0, 0.25], np.float32)).tolist()
    (SAE(jumprelu, d_in=2, d_sae=4, dtype=float32), [1.0, 0.0, 0.0, 0.0])
    """
    path = pathlib.Path(path)
    file = path / "params.npz" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"load_gemma_scope: {file} does not exist; a Gemma Scope SAE is a params.npz file.")
    with np.load(file) as data:
        tensors = {k: np.asarray(data[k]) for k in data.files}
    where = f"load_gemma_scope: {file}"
    enc = tensors.get("W_enc", tensors.get("w_enc"))
    if enc is None or enc.ndim != 2:
        raise ValueError(f"{where}: needs a 2-D tensor 'W_enc' [d_in, d_sae]; the file has "
                         f"{ {k: v.shape for k, v in tensors.items()} }.")
    d_in, d_sae = enc.shape
    return _build(tensors, "jumprelu", d_in, d_sae, where, _dtype(dtype, "load_gemma_scope"),
                  apply_b_dec_to_input=False, hook_name=hook_name)
