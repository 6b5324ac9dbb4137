"""LLM2Vec training: MNTP, unsupervised SimCSE and supervised contrastive, with LoRA (peft).

``train(stage, config)`` runs one stage; stages chain through ``config.peft`` (earlier adapters,
merged before the new LoRA). See :mod:`llm2vec_fast.train.config` for every option.
"""

from .config import STAGES, ConfigError, MNTPConfig, SimCSEConfig, SupervisedConfig, load_config, make_config
from .mntp import MNTPStage
from .simcse import SimCSEStage
from .supervised import SupervisedStage
from .trainer import train

STAGE_CLASSES = {"mntp": MNTPStage, "simcse": SimCSEStage, "supervised": SupervisedStage}

__all__ = [
    "STAGES",
    "STAGE_CLASSES",
    "ConfigError",
    "MNTPConfig",
    "SimCSEConfig",
    "SupervisedConfig",
    "load_config",
    "make_config",
    "train",
]
