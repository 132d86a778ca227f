"""Data pipeline: finding corpora, reading them, vocabularies, subwords, batches.

* :mod:`~latentnlp.data.sources`: where a corpus is (``--data``, ``$LATENTNLP_DATA``, hub);
* :mod:`~latentnlp.data.corpora`: readers for PTB, Yahoo, IWSLT14, Multi30k, parallel text;
* :mod:`~latentnlp.data.sigmorphon`: SIGMORPHON 2016 reinflection (task 3) and its tag inventory;
* :mod:`~latentnlp.data.vocabulary`: word vocabularies (LM corpora);
* :mod:`~latentnlp.data.subword`: sentencepiece models, trained and cached (MT);
* :mod:`~latentnlp.data.batching`: BPTT streams and length-bucketed batches, resumable.

Typical use::

    from latentnlp.data import read_ptb, BPTTStream
    ptb = read_ptb(args.data)
    vocab = ptb.vocabulary()                         # 10,000 types
    train = BPTTStream.from_sentences(ptb.train, vocab, batch_size=20, bptt=35)
    for batch in train.iterate(epoch, start=resume_at): ...

    from latentnlp.data import read_multi30k, train_sentencepiece, ParallelBatches
    m30k = read_multi30k(args.data)
    spm = train_sentencepiece(m30k.texts("train"), 8000)   # joint de+en BPE
    train = ParallelBatches.from_pairs(m30k.train, spm, max_tokens=4096, shuffle=True, seed=1)
"""

from .batching import (
    Batches,
    BPTTStream,
    ParallelBatches,
    SentenceBatches,
    bucket_batches,
    epoch_generator,
    lm_stream,
)
from .corpora import (
    SPLITS,
    LMCorpus,
    MissingSplitWarning,
    ParallelCorpus,
    lines_of,
    read_iwslt14,
    read_lines,
    read_multi30k,
    read_parallel,
    read_parallel_corpus,
    read_ptb,
    read_yahoo,
)
from .sigmorphon import (
    SIGMORPHON_LANGUAGES,
    Reinflection,
    ReinflectionExample,
    TagInventory,
    parse_tags,
    read_reinflection,
    read_task3,
)
from .sources import (
    DATA_ENV,
    CorpusNotFoundError,
    HubSpec,
    MissingSplitError,
    Source,
    find_local,
    hub_status,
    locate,
    portable_path,
)
from .subword import SentencePieceTokenizer, train_sentencepiece
from .vocabulary import Vocabulary

__all__ = [
    "Batches",
    "BPTTStream",
    "ParallelBatches",
    "SentenceBatches",
    "bucket_batches",
    "epoch_generator",
    "lm_stream",
    "SPLITS",
    "LMCorpus",
    "MissingSplitWarning",
    "ParallelCorpus",
    "lines_of",
    "read_iwslt14",
    "read_lines",
    "read_multi30k",
    "read_parallel",
    "read_parallel_corpus",
    "read_ptb",
    "read_yahoo",
    "SIGMORPHON_LANGUAGES",
    "Reinflection",
    "ReinflectionExample",
    "TagInventory",
    "parse_tags",
    "read_reinflection",
    "read_task3",
    "DATA_ENV",
    "CorpusNotFoundError",
    "HubSpec",
    "MissingSplitError",
    "Source",
    "find_local",
    "hub_status",
    "locate",
    "portable_path",
    "SentencePieceTokenizer",
    "train_sentencepiece",
    "Vocabulary",
]
