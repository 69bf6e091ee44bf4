"""Fine-tuning-stage defenses: the controls a provider's fine-tuning service applies to a user's fine-tune.

``data-filter`` (before training), ``lisa``, ``backdoor-align``, ``safety-mix``, ``constrained-sft`` and ``salora``
(during training, on the one engine's hooks). ``tunesec finetune`` (:mod:`tunesec.service`) runs them; importing
this package registers them without importing torch.
"""

from tunesec.defenses.finetune.backdoor_align import BackdoorAlign, BackdoorAlignConfig
from tunesec.defenses.finetune.base import FineTuneDefense, SafetyDataConfig, ServiceContext
from tunesec.defenses.finetune.constrained_sft import ConstrainedSFT, ConstrainedSFTConfig
from tunesec.defenses.finetune.data_filter import DataFilter, DataFilterConfig
from tunesec.defenses.finetune.lisa import Lisa, LisaConfig
from tunesec.defenses.finetune.safety_mix import SafetyMix, SafetyMixConfig
from tunesec.defenses.finetune.salora import SaLoRA, SaLoRAConfig

__all__ = [
    "BackdoorAlign",
    "BackdoorAlignConfig",
    "ConstrainedSFT",
    "ConstrainedSFTConfig",
    "DataFilter",
    "DataFilterConfig",
    "FineTuneDefense",
    "Lisa",
    "LisaConfig",
    "SaLoRA",
    "SaLoRAConfig",
    "SafetyDataConfig",
    "SafetyMix",
    "SafetyMixConfig",
    "ServiceContext",
]
