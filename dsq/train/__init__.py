"""Training: the trainer (:mod:`dsq.train.trainer`), its components (checkpointer, evaluation
schedule, step logger), the learning-rate schedule, progress display and stop signals."""

from dsq.train.schedule import lr_lambda
from dsq.train.trainer import Trainer, run

__all__ = ["Trainer", "lr_lambda", "run"]
