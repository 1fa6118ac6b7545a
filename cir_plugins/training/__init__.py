"""Training: the stage-1 (in-batch) and stage-2 (static bank) trainers, their configs and checkpoints."""

from .config import Stage1Config, Stage2Config, TrainConfig
from .stage1 import Stage1Trainer
from .stage2 import Stage2Trainer

__all__ = ["Stage1Config", "Stage1Trainer", "Stage2Config", "Stage2Trainer", "TrainConfig"]
