"""Models: the reference transformer, its functional interface, and adaptors for other Flax models."""

from idesign.models.config import TransformerConfig
from idesign.models.functional import Params, TransformerApply, functional, init_transformer
from idesign.models.transformer import KVCache, LayerCache, Transformer, dense_layer_names, rotary, site_names
from idesign.models.adaptors import LinenApply, NNXApply, from_linen, from_nnx
