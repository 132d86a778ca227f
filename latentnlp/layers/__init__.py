"""Drop-in layers for other people's models: log-probabilities over the vocabulary with the
latent variable (expert, alignment, copy switch) summed out exactly.  Each output layer is an
:class:`OutputHead` (``log_prob`` / ``log_probs``); ``encode_packed`` runs an LSTM over a padded batch."""

from latentnlp.layers.copy_generator import CopyGenerator, CopyOutput
from latentnlp.layers.crf import ChainCRF, bio_constraints, bioes_constraints
from latentnlp.layers.encoders import encode_packed
from latentnlp.layers.extended_vocabulary import ExtendedVocabulary
from latentnlp.layers.latent_attention import LatentAttention, LatentAttentionOutput
from latentnlp.layers.mixture_of_softmaxes import MixtureOfSoftmaxes
from latentnlp.layers.output_head import HeadOutput, OutputHead
from latentnlp.layers.softmax_output import SoftmaxOutput

__all__ = [
    "ChainCRF",
    "CopyGenerator",
    "CopyOutput",
    "ExtendedVocabulary",
    "HeadOutput",
    "LatentAttention",
    "LatentAttentionOutput",
    "MixtureOfSoftmaxes",
    "OutputHead",
    "SoftmaxOutput",
    "bio_constraints",
    "bioes_constraints",
    "encode_packed",
]
