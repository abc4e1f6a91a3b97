"""Saving and loading probes with their metadata, through :mod:`idesign.checkpoint` (orbax)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from idesign.checkpoint import restore_checkpoint, save_checkpoint
from idesign.probes._scoring import PROBE_TYPES, Probe

_FAMILIES = {t.__name__: t for t in PROBE_TYPES}
_FORMAT = 1
_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)")


def save_probe(path: str | Path, probe: Probe, *, site: str | None = None, layer: int | None = None,
               metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Saves a probe (its arrays, as an orbax checkpoint) with JSON metadata.

    The metadata records the family (class name), each field's shape and dtype, the site and layer
    the probe reads (``layer`` defaults to the block index in ``site``, e.g. 3 for
    ``blocks.3.resid_post``) and any JSON-serialisable ``metadata`` (fit config, metrics). The
    standardisation is part of the probe's arrays. Probes stacked by :func:`fit_many` save as they are.

    Returns:
      The checkpoint's path.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.MassMeanProbe(w=jnp.ones(3), b=jnp.array(0.5))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = probes.save_probe(d, p, site="blocks.3.resid_post", metadata={"auc": 0.9})
      ...     q, info = probes.load_probe(d)
      >>> float(q.b), info["layer"], info["metadata"]
      (0.5, 3, {'auc': 0.9})
    """
    family = type(probe).__name__
    if family not in _FAMILIES or not isinstance(probe, _FAMILIES[family]):
        raise TypeError(f"save_probe: expected a probe ({', '.join(_FAMILIES)}), got {family}.")
    if layer is None and site is not None:
        found = _LAYER.search(site)
        layer = int(found.group(1)) if found else None
    info = {
        "probe": {
            "family": family,
            "format": _FORMAT,
            "fields": {k: {"shape": list(jnp.shape(v)), "dtype": str(jnp.asarray(v).dtype)}
                       for k, v in probe._asdict().items()},
        },
        "site": site,
        "layer": layer,
        "metadata": dict(metadata or {}),
    }
    return save_checkpoint(path, probe, metadata=info, overwrite=overwrite)


def load_probe(path: str | Path) -> tuple[Probe, dict[str, Any]]:
    """Loads a probe saved by :func:`save_probe`.

    Returns:
      ``(probe, info)`` with ``info = {"family", "site", "layer", "metadata"}``.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: the checkpoint holds no probe, or an unknown family.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from idesign import probes
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = probes.save_probe(d, probes.MassMeanProbe(jnp.ones(2), jnp.array(0.0)))
      ...     probe, info = probes.load_probe(d)
      >>> type(probe).__name__, info["family"]
      ('MassMeanProbe', 'MassMeanProbe')
    """
    tree, meta = restore_checkpoint(path, None)
    spec = meta.get("probe") if isinstance(meta, Mapping) else None
    if not spec or "family" not in spec:
        raise ValueError(f"load_probe: {path} is a checkpoint but not a probe (no probe metadata); "
                         "was it written by save_probe?")
    family = spec["family"]
    if family not in _FAMILIES:
        raise ValueError(f"load_probe: {path} holds an unknown probe family {family!r}; known: {sorted(_FAMILIES)}.")
    cls = _FAMILIES[family]
    missing = [f for f in cls._fields if f not in tree]
    if missing:
        raise ValueError(f"load_probe: {path} lacks the fields {missing} of a {family}.")
    probe = cls(**{f: jnp.asarray(tree[f], dtype=spec["fields"][f]["dtype"]) for f in cls._fields})
    info = {"family": family, "site": meta.get("site"), "layer": meta.get("layer"),
            "metadata": meta.get("metadata", {})}
    return probe, info
