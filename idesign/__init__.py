"""idesign: interpretability as the observation system of training, in JAX.

Users write ``import idesign as ids``.
"""

from idesign import (activations, checkpoint, circuits, curvature, data, discovery, distributed, edit, evaluation,
                     hooks, masks, metrics, models, monitoring, optim, preference, pretrain, probes, rl, sae, shaping,
                     sharding, subspaces, train, tree)
from idesign import data_attribution  # issue 18: which preference pairs push a behaviour
from idesign import activation_store  # issue 16: activations streamed to sharded files on disk
from idesign.activations import collect_activations, pad_tokens, stream_activations
from idesign.checkpoint import (CheckpointCorruptError, CheckpointManager, CheckpointMismatchError, abstract_like,
                                restore_checkpoint, save_checkpoint)
from idesign.hooks import Ablate, Add, Apply, Capture, Intervention, Replace, Route, SiteRunner, capture, merge_hooks
from idesign.models import (KVCache, Transformer, TransformerApply, TransformerConfig, functional, init_transformer,
                            load_pretrained, load_tokenizer)

from idesign.generate import (GenerateOutput, InjectAfterToken, Injection, Monitor, PromptInfo, SamplingConfig,
                              StepInfo, filter_logits, generate, sample_logits)
from idesign.monitoring import ProbeMonitor, ProbeMonitorState
from idesign.train import TrainState, init_train_state, lm_loss, make_train_step

__version__ = "0.1.0"
