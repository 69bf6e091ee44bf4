"""Alignment-stage defenses: make a model safe before anyone fine-tunes it."""

from tunesec.defenses.alignment.safety_sft import SafetySFT, SafetySFTConfig, build_alignment_data

__all__ = ["SafetySFT", "SafetySFTConfig", "build_alignment_data"]
