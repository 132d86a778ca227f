"""Models behind the one :class:`~latentnlp.models.base.LatentModel` API."""

from .base import ELBO, OBJECTIVES, IntractableError, LatentModel, Loss, UnsupportedObjectiveError
from .binary_vae import BinaryVAE
from .hmm_lm import HMMLanguageModel
from .latent_alignment import LatentAlignmentSeq2Seq
from .lstm_lm import LSTMLanguageModel, MixtureOfSoftmaxesLM
from .neural_topic_model import NeuralTopicModel

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
    "BinaryVAE",
    "NeuralTopicModel",
]
