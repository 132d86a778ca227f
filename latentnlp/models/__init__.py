"""Models behind the one :class:`~latentnlp.models.base.LatentModel` API."""

from .base import ELBO, OBJECTIVES, IntractableError, LatentModel, Loss, UnsupportedObjectiveError
from .hmm_lm import HMMLanguageModel
from .latent_alignment import LatentAlignmentSeq2Seq
from .lstm_lm import LSTMLanguageModel, MixtureOfSoftmaxesLM
from .sentence_vae import SentenceVAE

__all__ = [
    "ELBO",
    "OBJECTIVES",
    "IntractableError",
    "LatentModel",
    "Loss",
    "UnsupportedObjectiveError",
    "HMMLanguageModel",
    "LatentAlignmentSeq2Seq",
    "LSTMLanguageModel",
    "MixtureOfSoftmaxesLM",
    "SentenceVAE",
]
