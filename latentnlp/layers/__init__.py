"""Drop-in output layers: log-probabilities over the vocabulary with the latent variable summed out."""

from latentnlp.layers.mixture_of_softmaxes import MixtureOfSoftmaxes
from latentnlp.layers.softmax_output import SoftmaxOutput

__all__ = ["MixtureOfSoftmaxes", "SoftmaxOutput"]

from latentnlp.layers.copy_generator import CopyGenerator, CopyOutput
from latentnlp.layers.latent_attention import LatentAttention, LatentAttentionOutput

__all__ += ["CopyGenerator", "CopyOutput", "LatentAttention", "LatentAttentionOutput"]
