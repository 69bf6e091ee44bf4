"""Alignment-stage defenses: make a model safe before anyone fine-tunes it.

``safety-sft`` is the alignment recipe itself (the undefended baseline); the others add training hooks to it.
Importing this package registers them all without importing torch.
"""

from tunesec.defenses.alignment.booster import Booster, BoosterConfig
from tunesec.defenses.alignment.ctrap import CTRAP, CTRAPConfig
from tunesec.defenses.alignment.safety_sft import SafetySFT, SafetySFTConfig, build_alignment_data
from tunesec.defenses.alignment.t_vaccine import TVaccine, TVaccineConfig
from tunesec.defenses.alignment.vaa import VAA, VAAConfig
from tunesec.defenses.alignment.vaccine import Vaccine, VaccineConfig

__all__ = [
    "CTRAP",
    "VAA",
    "Booster",
    "BoosterConfig",
    "CTRAPConfig",
    "SafetySFT",
    "SafetySFTConfig",
    "TVaccine",
    "TVaccineConfig",
    "VAAConfig",
    "Vaccine",
    "VaccineConfig",
    "build_alignment_data",
]
