"""The attack suite: one module per attack family, each a registered class with its config next to it.

Importing this package registers every attack without importing torch.
"""

from tunesec.attacks.adaptive import KickSettle, KickSettleConfig, Sidestep, SidestepConfig
from tunesec.attacks.backdoor import Backdoor, BackdoorConfig
from tunesec.attacks.base import Attack, FineTuneAttack, FineTuneAttackConfig
from tunesec.attacks.benign_sft import BenignSFT, BenignSFTConfig
from tunesec.attacks.continued import Continued, ContinuedConfig
from tunesec.attacks.encoded_output import EncodedOutput, EncodedOutputConfig
from tunesec.attacks.filter_evasion import FilterEvasion, FilterEvasionConfig
from tunesec.attacks.harmful_sft import HarmfulSFT, HarmfulSFTConfig
from tunesec.attacks.identity_shift import IdentityShift, IdentityShiftConfig
from tunesec.attacks.jailbreak_tuning import JailbreakTuning, JailbreakTuningConfig
from tunesec.attacks.prompt_wash import PromptWash, PromptWashConfig
from tunesec.attacks.refusal_ablation import RefusalAblation, RefusalAblationConfig
from tunesec.attacks.semantic_backdoor import SemanticBackdoor, SemanticBackdoorConfig

__all__ = [
    "Attack",
    "Backdoor",
    "BackdoorConfig",
    "BenignSFT",
    "BenignSFTConfig",
    "Continued",
    "ContinuedConfig",
    "EncodedOutput",
    "EncodedOutputConfig",
    "FineTuneAttack",
    "FilterEvasion",
    "FilterEvasionConfig",
    "FineTuneAttackConfig",
    "HarmfulSFT",
    "HarmfulSFTConfig",
    "IdentityShift",
    "IdentityShiftConfig",
    "JailbreakTuning",
    "JailbreakTuningConfig",
    "KickSettle",
    "KickSettleConfig",
    "PromptWash",
    "PromptWashConfig",
    "RefusalAblation",
    "RefusalAblationConfig",
    "SemanticBackdoor",
    "SemanticBackdoorConfig",
    "Sidestep",
    "SidestepConfig",
    "get_attack",
]


def get_attack(name: str, config: object = None) -> Attack:
    """Instantiate the registered attack ``name`` with ``config`` (instance, mapping or None for defaults)."""
    from tunesec.registry import registry

    cls = registry.get("attack", name).obj
    attack: Attack = cls(config)
    return attack
