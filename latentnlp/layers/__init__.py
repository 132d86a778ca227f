"""Drop-in layers for other people's models: log-probabilities over the vocabulary with the
latent variable (expert, alignment, copy switch) summed out exactly."""

from latentnlp.layers.copy_generator import CopyGenerator, CopyOutput
from latentnlp.layers.crf import ChainCRF, bio_constraints, bioes_constraints
from latentnlp.layers.latent_attention import LatentAttention, LatentAttentionOutput
from latentnlp.layers.mixture_of_softmaxes import MixtureOfSoftmaxes
from latentnlp.layers.softmax_output import SoftmaxOutput

__all__ = ["ChainCRF", "CopyGenerator", "CopyOutput", "LatentAttention", "LatentAttentionOutput", "MixtureOfSoftmaxes",
           "SoftmaxOutput", "bio_constraints", "bioes_constraints"]
