"""Training loop glue: schedules, checkpoints with exact resume, logs."""

from medstate.train.loop import TrainConfig, Trainer, TrainResult, checkpoint_step
from medstate.train.schedules import learning_rate_factor

__all__ = ["TrainConfig", "TrainResult", "Trainer", "checkpoint_step", "learning_rate_factor"]
