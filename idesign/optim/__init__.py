"""optax transforms for training-time shaping and observation: element-level freezing, gradient projection,
and the decomposition of each update onto concept directions.

Each transform is an ``optax.GradientTransformation`` that drops into ``optax.chain`` next to the
user's optimizer (``ids.optim.freeze(mask)``), or wrap an optimizer (``ids.optim.frozen(adamw, freeze_mask=mask)``,
``ids.optim.projected(adamw, subspaces)``, ``ids.optim.observed(adamw, concepts)``).
"""

from idesign.optim._freezing import FrozenState, freeze, frozen, frozen_state_savings, opt_state_nbytes
from idesign.optim import projection
from idesign.optim.projection import (ConflictState, ProjectedState, ProjectionState, apply_projection, check_subspaces,
                                      project_conflicting, project_onto, project_out, projected, subspaces_for)
from idesign.optim import decomposition
from idesign.optim.decomposition import (ConceptLog, Concepts, ObserveConceptsState, ObservedState, check_concepts,
                                         concepts_for, decompose_update, find_observations, observe_concepts, observed,
                                         plot_concept_log)
from idesign.optim._layer_stacked import LayerStackedState, layer_stacked
from idesign.optim._verify import Leak, verify_frozen, verify_projected
