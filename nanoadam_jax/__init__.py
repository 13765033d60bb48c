"""nanoadam-jax: fine-tune by updating only the small-magnitude weights (NanoAdam).

An independent JAX/Optax implementation of "Pay Attention to Small Weights"
(Zhou, Jacobs, Gadhikar, Burkholz, NeurIPS 2025).

Example:
  >>> import optax, nanoadam_jax as nanoadam
  >>> tx = nanoadam.nanoadam(learning_rate=1e-4, density=0.1, mask_interval=100)
  >>> isinstance(tx, optax.GradientTransformation)
  True
"""

from nanoadam_jax import config, labels, layout, masking, refresh, schedules, selection, transform
from nanoadam_jax.alias import nanoadam, nanoadamw
from nanoadam_jax.labels import (
    DENSE,
    FROZEN,
    SPARSE,
    default_labels,
    find_heads,
    label_params,
    path_names,
)
from nanoadam_jax.layout import SelectionDimensionNumbers, select_mask
from nanoadam_jax.masking import (
    MagnitudeMaskState,
    MaskedApplyState,
    magnitude_mask,
    mask,
    masked_apply,
)
from nanoadam_jax.plan import LeafPlan, Plan, plan
from nanoadam_jax.relayout import relayout
from nanoadam_jax.schedules import constant_density, linear_density_decay
from nanoadam_jax.selection import (
    bottom_k_mask,
    kth_smallest_key,
    num_selected,
    select_global_masks,
    selection_keys,
)
from nanoadam_jax.transform import SparseUpdateState, sparse_update

__version__ = "0.1.0"

__all__ = [
    "DENSE",
    "FROZEN",
    "LeafPlan",
    "SPARSE",
    "SelectionDimensionNumbers",
    "MagnitudeMaskState",
    "MaskedApplyState",
    "Plan",
    "SparseUpdateState",
    "bottom_k_mask",
    "config",
    "constant_density",
    "default_labels",
    "find_heads",
    "kth_smallest_key",
    "label_params",
    "labels",
    "layout",
    "linear_density_decay",
    "magnitude_mask",
    "mask",
    "masking",
    "masked_apply",
    "nanoadam",
    "nanoadamw",
    "num_selected",
    "path_names",
    "plan",
    "refresh",
    "relayout",
    "schedules",
    "select_global_masks",
    "select_mask",
    "selection",
    "selection_keys",
    "sparse_update",
    "transform",
]
