"""``deep-alignment``: safety alignment made more than a few tokens deep (Qi et al. 2024, arXiv 2406.05946).

Aligned models refuse in their first few answer tokens; once those are forced or fine-tuned away, the rest of
the answer follows the harmful request. Qi et al. augment alignment with *safety-recovery examples*: the request,
the first k tokens of a harmful answer, then the refusal, with the loss on the refusal only (official code:
Unispac/shallow-vs-deep-alignment@fb1749e; k uniform up to 100 tokens, half of the refusal examples).

This is the ``safety-sft`` recipe with that augmentation, exposed as a defense of its own so that it takes part in
the same tables: the shipped aligned recipe plus ``deep_alignment`` = 0.5 (the paper's share) and
``decision_continue_weight`` = 0.1, the settings of ``recipes/align-smollm2-deep.yaml``. On this 135M model the
recovery examples deepen the alignment only when benign answers are also kept from breaking off into a refusal
(the continuation term; docs/RESULTS.md, v23-v25). The harmful prefixes are the model's own greedy answers to the
refusal prompts (no harmful-answer dataset is trained on). Every ``safety-sft`` field can be overridden.
"""

from __future__ import annotations

from tunesec.defenses.alignment.safety_sft import SafetySFT, SafetySFTConfig
from tunesec.registry import register

DEEP_SETTINGS = {"deep_alignment": 0.5, "decision_continue_weight": 0.1}


@register(
    "defense",
    "deep-alignment",
    description="Safety-recovery examples: a harmful answer's first k words, then the refusal (Qi et al. 2024).",
    stage="alignment",
    paper="Qi et al. 2024, Safety Alignment Should Be Made More Than Just a Few Tokens Deep, arXiv 2406.05946",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class DeepAlignment(SafetySFT):
    """The shipped recipe with Qi et al.'s augmentation (see the module docstring)."""

    name = "deep-alignment"
    config_class = SafetySFTConfig

    @classmethod
    def base_config(cls) -> SafetySFTConfig:
        """The shipped aligned recipe with half of its refusals made safety-recovery examples."""
        return SafetySFT.base_config().model_copy(update=DEEP_SETTINGS)
