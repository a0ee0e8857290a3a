"""fewstep: distill many-step diffusion and flow teachers into 1-4 step students."""

__version__ = "0.1.0.dev0"

from fewstep.api import distill, evaluate_samples, export, load_model, pairs, sample, train_teacher  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402

__all__ = ["FewstepError", "__version__", "distill", "evaluate_samples", "export", "load_model", "pairs", "sample",
           "train_teacher"]
