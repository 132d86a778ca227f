"""latentnlp: latent-variable models of natural language with exact dynamic programming."""

from .semirings import LogSemiring, MaxSemiring
from .structures import ChainPosterior

__all__ = ["ChainPosterior", "LogSemiring", "MaxSemiring"]
__version__ = "0.1.0"
