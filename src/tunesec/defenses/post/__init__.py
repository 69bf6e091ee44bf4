"""Post-fine-tuning repairs (stage ``post-fine-tuning``): functions from (tuned, aligned[, base]) to a new model.

``safelora`` (project low-similarity layers' updates onto the alignment subspace), ``resta`` (add back a
safety vector), ``antidote`` (prune the update's weights most important on harmful data) and ``merge-back``
(interpolate toward the aligned model under a utility bound). :func:`repair` is the Python form of
``tunesec repair``; importing this package registers the repairs without importing torch.
"""

from tunesec.defenses.post.antidote import Antidote, AntidoteConfig
from tunesec.defenses.post.base import (
    STAGE,
    DenseModel,
    PostRepair,
    RepairInputs,
    get_repair,
    load_dense,
    repair,
    repair_entry,
    resolve_model,
)
from tunesec.defenses.post.merge_back import MergeBack, MergeBackConfig
from tunesec.defenses.post.resta import RESTA, RESTAConfig
from tunesec.defenses.post.safelora import SafeLoRA, SafeLoRAConfig

__all__ = [
    "RESTA",
    "STAGE",
    "Antidote",
    "AntidoteConfig",
    "DenseModel",
    "MergeBack",
    "MergeBackConfig",
    "PostRepair",
    "RESTAConfig",
    "RepairInputs",
    "SafeLoRA",
    "SafeLoRAConfig",
    "get_repair",
    "load_dense",
    "repair",
    "repair_entry",
    "resolve_model",
]
