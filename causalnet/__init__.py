"""causalnet: neural networks as structural causal models.

The model (graph + mechanisms) is :class:`SCM` (``causalnet.scm``); the questions asked of it
are plain functions: effects (``causalnet.effects``), ablation distributions
(``causalnet.ablations``) and graph queries / drawing (``causalnet.graph``).
"""

__version__ = "0.1.0"

from causalnet.ablations import Ablation, Mean, Noise, Resample, Zero
from causalnet.effects import direct_effect, indirect_effect, total_effect
from causalnet.graph import ancestors, descendants, directed_paths, draw, topological_order
from causalnet.scm import SCM, DoValue

__all__ = [
    "__version__",
    "SCM",
    "DoValue",
    "Ablation",
    "Zero",
    "Mean",
    "Resample",
    "Noise",
    "total_effect",
    "direct_effect",
    "indirect_effect",
    "ancestors",
    "descendants",
    "directed_paths",
    "topological_order",
    "draw",
]
