"""Training a student: the run (`run.py`: config, directory, resume rules), the loop (`trainer.py`), checkpoints
(`checkpoint.py`), the final report (`report.py`), devices and processes (`accelerator.py`), and `distill()`
(`distillation.py`), which puts them together."""

from fewstep.training.config import DistillConfig
from fewstep.training.distillation import distill

__all__ = ["DistillConfig", "distill"]
