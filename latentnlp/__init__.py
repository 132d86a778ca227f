"""latentnlp: latent-variable models of natural language with exact dynamic programming."""

from . import baum_welch  # noqa: F401  (latentnlp.baum_welch.fit, e_step, m_step)
from .factorial import FactorialChainPosterior
from .semirings import LogSemiring, MaxSemiring
from .structures import ChainPosterior, cross_entropy
from .transitions import DenseTransition, LowRankTransition, Transition

__all__ = [
    "ChainPosterior",
    "DenseTransition",
    "FactorialChainPosterior",
    "LogSemiring",
    "LowRankTransition",
    "MaxSemiring",
    "Transition",
    "cross_entropy",
]
__version__ = "0.1.0"
