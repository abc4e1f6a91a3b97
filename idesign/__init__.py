"""idesign: interpretability as the observation system of training, in JAX.

Users write ``import idesign as ids``.
"""

from idesign import hooks, models, tree
from idesign.hooks import Ablate, Add, Capture, Intervention, Replace, Route, SiteRunner, capture, merge_hooks
from idesign.models import KVCache, Transformer, TransformerApply, TransformerConfig, functional, init_transformer

__version__ = "0.1.0"
