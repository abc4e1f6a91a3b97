"""Models: the reference transformer, its functional interface, adaptors for other Flax models, importers."""

from idesign.models.config import RopeScaling, TransformerConfig
from idesign.models._functional import Params, TransformerApply, functional, init_transformer
from idesign.models._scan import is_stacked, layer_params, stack_blocks, stack_mask, unstack_blocks
from idesign.models.transformer import (check_tokens, checkify_tokens, KVCache, LayerCache, Transformer, dense_layer_names, rope_frequencies,
                                        rotary, site_names)
from idesign.models.adaptors import LinenApply, NNXApply, from_linen, from_nnx
from idesign.models.importers import (SUPPORTED_ARCHITECTURES, Tokenizer, config_from_hf, load_pretrained,
                                      load_tokenizer)
