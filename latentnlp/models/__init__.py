"""Models behind the one :class:`~latentnlp.models.base.LatentModel` API."""

from .base import ELBO, OBJECTIVES, IntractableError, LatentModel, Loss, UnsupportedObjectiveError
from .bernoulli_factor import BernoulliFactorModel
from .binary_vae import BinaryVAE
from .factorial_hmm import FactorialHMM
from .feature_hmm import FeatureHMM
from .hmm_lm import HMMLanguageModel
from .latent_alignment import LatentAlignmentSeq2Seq
from .lstm_lm import LSTMLanguageModel, MixtureOfSoftmaxesLM
from .mixture_of_categoricals import MixtureOfCategoricals
from .multi_space_vae import MultiSpaceVAE
from .neural_topic_model import NeuralTopicModel
from .sentence_vae import SentenceVAE

__all__ = [
    "ELBO",
    "OBJECTIVES",
    "IntractableError",
    "LatentModel",
    "Loss",
    "UnsupportedObjectiveError",
    "FactorialHMM",
    "FeatureHMM",
    "HMMLanguageModel",
    "LatentAlignmentSeq2Seq",
    "LSTMLanguageModel",
    "MixtureOfSoftmaxesLM",
    "MultiSpaceVAE",
    "MixtureOfCategoricals",
    "BernoulliFactorModel",
    "SentenceVAE",
    "BinaryVAE",
    "NeuralTopicModel",
]
