"""Attentional sequence-to-sequence models by composition: an encoder-decoder core, an output head and
an objective (:class:`~latentnlp.models.latent_alignment.LatentAlignmentSeq2Seq` puts them together)."""

from latentnlp.models.seq2seq.core import AttentionalEncoderDecoder, DecoderOutput, DecoderState
from latentnlp.models.seq2seq.heads import CopyHead, LatentAttentionHead, Seq2SeqHead, SoftAttentionHead
from latentnlp.models.seq2seq.objectives import AlignmentELBO, InferenceNetwork, Marginal

__all__ = [
    "AlignmentELBO",
    "AttentionalEncoderDecoder",
    "CopyHead",
    "DecoderOutput",
    "DecoderState",
    "InferenceNetwork",
    "LatentAttentionHead",
    "Marginal",
    "Seq2SeqHead",
    "SoftAttentionHead",
]
