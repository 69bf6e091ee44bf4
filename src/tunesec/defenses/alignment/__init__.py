"""Alignment-stage defenses: make a model safe before anyone fine-tunes it.

``safety-sft`` is the alignment recipe itself (the undefended baseline); the others add training hooks to it.
Importing this package registers them all without importing torch.
"""

from tunesec.defenses.alignment.booster import Booster, BoosterConfig
from tunesec.defenses.alignment.ctrap import CTRAP, CTRAPConfig
from tunesec.defenses.alignment.deep_alignment import DeepAlignment
from tunesec.defenses.alignment.repnoise import RepNoise, RepNoiseConfig
from tunesec.defenses.alignment.safety_sft import SafetySFT, SafetySFTConfig, build_alignment_data
from tunesec.defenses.alignment.sdd import SDD, SDDConfig
from tunesec.defenses.alignment.seam import SEAM, SEAMConfig
from tunesec.defenses.alignment.t_vaccine import TVaccine, TVaccineConfig
from tunesec.defenses.alignment.tar import TAR, TARConfig
from tunesec.defenses.alignment.unlearn_smooth import UnlearnSmooth, UnlearnSmoothConfig
from tunesec.defenses.alignment.vaa import VAA, VAAConfig
from tunesec.defenses.alignment.vaccine import Vaccine, VaccineConfig

__all__ = [
    "CTRAP",
    "SDD",
    "SEAM",
    "TAR",
    "TARConfig",
    "VAA",
    "Booster",
    "BoosterConfig",
    "CTRAPConfig",
    "DeepAlignment",
    "SafetySFT",
    "SDDConfig",
    "SEAMConfig",
    "RepNoise",
    "RepNoiseConfig",
    "SafetySFTConfig",
    "TVaccine",
    "TVaccineConfig",
    "UnlearnSmooth",
    "UnlearnSmoothConfig",
    "VAAConfig",
    "Vaccine",
    "VaccineConfig",
    "build_alignment_data",
]
