"""fewstep: distill many-step diffusion and flow teachers into 1-4 step students."""

__version__ = "0.1.0.dev0"

from fewstep.api import (  # noqa: E402
    clip_score,
    distill,
    evaluate_samples,
    export,
    fid,
    list_methods,
    list_teachers,
    load_model,
    pairs,
    reference_stats,
    sample,
    train_teacher,
)
from fewstep.errors import FewstepError  # noqa: E402

__all__ = ["FewstepError", "__version__", "clip_score", "distill", "evaluate_samples", "export", "fid", "list_methods",
           "list_teachers", "load_model", "pairs", "reference_stats", "sample", "train_teacher"]
