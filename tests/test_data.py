"""Tests of latentnlp.data: sources, readers, vocabularies, sentencepiece, batching.

Tests on the real corpora are skipped unless $LATENTNLP_DATA is set (the counts
are those of shared/data/README.md).  Nothing here touches the network.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import pickle
import random
import time

# before anything imports `datasets` / `huggingface_hub`: never go online from tests
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from latentnlp.data import (
    DATA_ENV,
    BPTTStream,
    CorpusNotFoundError,
    MissingSplitError,
    MissingSplitWarning,
    ParallelBatches,
    SentenceBatches,
    SentencePieceTokenizer,
    Vocabulary,
    bucket_batches,
    hub_status,
    lm_stream,
    locate,
    read_iwslt14,
    read_lines,
    read_multi30k,
    read_parallel,
    read_ptb,
    read_yahoo,
    train_sentencepiece,
)

REAL = os.environ.get(DATA_ENV)
needs_data = pytest.mark.skipif(not REAL, reason=f"${DATA_ENV} not set")


# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------
def test_vocabulary_round_trip(tmp_path):
    text = ["the cat sat on the mat", "the dog sat", "a cat"]
    v = Vocabulary.build(text, pad="<pad>", bos="<bos>")
    # specials first (pad, bos, eos, unk), then by frequency, ties by first appearance
    assert v.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert v.itos[4:7] == ["the", "cat", "sat"]
    assert (v.pad_id, v.bos_id, v.eos_id, v.unk_id) == (0, 1, 2, 3)
    assert len(v) == 4 + 7
    ids = v.encode("the cat sat on the mat", add_bos=True, add_eos=True)
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id
    assert v.decode(ids) == ["<bos>", "the", "cat", "sat", "on", "the", "mat", "<eos>"]
    assert v.decode(torch.tensor(ids), skip_special=True) == "the cat sat on the mat".split()
    assert v.encode(["zebra"]) == [v.unk_id] and v["zebra"] == v.unk_id
    path = tmp_path / "vocab.json"
    v.save(path)
    w = Vocabulary.load(path)
    assert w == v and w.counts == v.counts and w.encode(text[0]) == v.encode(text[0])

    small = Vocabulary.build(text, max_size=5)
    assert small.itos == ["<eos>", "<unk>", "the", "cat", "sat"]
    assert Vocabulary.build(text, min_freq=2).itos == ["<eos>", "<unk>", "the", "cat", "sat"]
    with pytest.raises(ValueError, match="unk"):
        Vocabulary.build(text, max_size=5, unk=None)
    strict = Vocabulary.build(text, unk=None)
    with pytest.raises(KeyError):
        strict.encode(["zebra"])


def test_vocabulary_special_in_text_not_counted_twice():
    v = Vocabulary.build(["a <unk> b", "<unk> a"])
    assert v.itos == ["<eos>", "<unk>", "a", "b"]


def test_vocabulary_from_file(tmp_path):
    (tmp_path / "v.tsv").write_text("<pad>\t0\n<bos>\t1\n<eos>\t2\n_UNK\t3\nb\t5\na\t4\n")
    v = Vocabulary.from_file(tmp_path / "v.tsv", pad="<pad>", bos="<bos>", unk="_UNK")
    assert v.itos == ["<pad>", "<bos>", "<eos>", "_UNK", "a", "b"]
    assert (v.pad_id, v.bos_id, v.eos_id, v.unk_id) == (0, 1, 2, 3)
    (tmp_path / "v.txt").write_text("x\n_UNK\ny\n")
    w = Vocabulary.from_file(tmp_path / "v.txt", unk="_UNK", pad="<pad>")
    assert w.itos == ["x", "_UNK", "y"] and w.pad_id is None and w.eos_id is None


# ---------------------------------------------------------------------------------------------
# BPTT streams
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch_size,bptt", [(1000, 4, 7), (101, 10, 5), (50, 1, 49), (23, 2, 100)])
def test_bptt_stream_continuity(n, batch_size, bptt):
    ids = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n))
    stream = BPTTStream(ids, batch_size, bptt)
    batches = list(stream)
    L = (n - 1) // batch_size
    assert len(batches) == len(stream) == -(-L // bptt)
    for i, b in enumerate(batches):
        T = b["inputs"].shape[1]
        assert b["inputs"].shape == b["targets"].shape == (batch_size, T)
        assert b["inputs"].dtype == b["targets"].dtype == b["lengths"].dtype == torch.long
        assert b["lengths"].tolist() == [T] * batch_size and b["stream"] is True
        assert T == (bptt if i < len(batches) - 1 else L - bptt * (len(batches) - 1))
    inputs = torch.cat([b["inputs"] for b in batches], dim=1)
    targets = torch.cat([b["targets"] for b in batches], dim=1)
    for r in range(batch_size):  # each row continues across batches and tiles the stream
        assert torch.equal(inputs[r], ids[r * L : (r + 1) * L])
        assert torch.equal(targets[r], ids[r * L + 1 : (r + 1) * L + 1])
    assert stream.num_tokens == batch_size * L
    # resuming mid-epoch gives the rest of the same epoch
    k = len(batches) // 2
    rest = list(stream.iterate(epoch=3, start=k))
    assert len(rest) == len(batches) - k
    assert all(torch.equal(a["inputs"], b["inputs"]) for a, b in zip(rest, batches[k:]))
    with pytest.raises(ValueError, match="start"):
        stream.iterate(0, start=len(stream) + 1)


def test_batches_declare_stream_kind():
    assert BPTTStream(torch.arange(20), 2, 3).stream is True
    assert SentenceBatches([[4]], bos_id=1, eos_id=2, batch_size=1).stream is False


def test_lm_stream_adds_eos():
    v = Vocabulary.build(["a b", "c"])
    s = lm_stream([["a", "b"], ["c"]], v, prepend_eos=True)
    assert v.decode(s) == ["<eos>", "a", "b", "<eos>", "c", "<eos>"]
    one = BPTTStream(s, 1, 100)
    assert one.num_tokens == 5  # every word and every <eos> is a target


# ---------------------------------------------------------------------------------------------
# bucketed batches
# ---------------------------------------------------------------------------------------------
def _random_sentences(n, seed=0, max_len=30):
    rng = random.Random(seed)
    return [[rng.randrange(4, 100) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


@pytest.mark.parametrize("limits", [dict(batch_size=16), dict(max_tokens=200), dict(batch_size=8, max_tokens=150)])
def test_sentence_batches_cover_once_and_pad(limits):
    ex = _random_sentences(300)
    sb = SentenceBatches(ex, bos_id=1, eos_id=2, pad_id=0, shuffle=True, seed=7, **limits)
    seen = []
    for b in sb.iterate(epoch=0):
        inp, tgt, lengths, idx = b["inputs"], b["targets"], b["lengths"], b["indices"]
        B, T = inp.shape
        assert tgt.shape == (B, T) and lengths.shape == idx.shape == (B,)
        assert int(lengths.max()) == T and int(lengths.min()) >= 1
        if "batch_size" in limits:
            assert B <= limits["batch_size"]
        if "max_tokens" in limits:
            assert B * T <= limits["max_tokens"] or B == 1
        for row in range(B):
            e, n = ex[int(idx[row])], int(lengths[row])
            assert n == len(e) + 1
            assert inp[row, :n].tolist() == [1] + e and tgt[row, :n].tolist() == e + [2]
            assert (inp[row, n:] == 0).all() and (tgt[row, n:] == 0).all()
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(ex)))


def test_bucketing_reduces_padding_and_is_reproducible():
    ex = _random_sentences(500, seed=1)
    sb = SentenceBatches(ex, bos_id=1, eos_id=2, max_tokens=300, shuffle=True, seed=3)
    epoch0 = [b["indices"].tolist() for b in sb.iterate(0)]
    assert epoch0 == [b["indices"].tolist() for b in sb.iterate(0)]
    epoch1 = [b["indices"].tolist() for b in sb.iterate(1)]
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0) == len(sb)
    other = SentenceBatches(ex, bos_id=1, eos_id=2, max_tokens=300, shuffle=True, seed=4)
    assert [b["indices"].tolist() for b in other.iterate(0)] != epoch0
    sb.set_epoch(1)
    assert [b["indices"].tolist() for b in sb] == epoch1
    assert [b["indices"].tolist() for b in sb.iterate(1, start=5)] == epoch1[5:]
    padded = sum(b["inputs"].numel() for b in sb.iterate(0))
    real = sum(len(e) + 1 for e in ex)
    assert padded < 1.2 * real  # length bucketing keeps padding small


def test_bucket_batches_plain_order():
    assert bucket_batches([3, 1, 2, 5], batch_size=2, sort=False) == [[0, 1], [2, 3]]
    assert bucket_batches([3, 1, 2, 5], batch_size=2) == [[1, 2], [0, 3]]
    assert bucket_batches([10, 1, 1], max_tokens=4) == [[1, 2], [0]]  # too long: alone
    with pytest.raises(ValueError):
        bucket_batches([1, 2], sort=False)


def test_parallel_batches_layout_and_resume():
    src = _random_sentences(200, seed=2)
    src = [s or [5] for s in src]
    tgt = _random_sentences(200, seed=3)
    pb = ParallelBatches(
        list(zip(src, tgt)), bos_id=2, eos_id=3, pad_id=0, src_eos_id=3, max_tokens=256, shuffle=True, seed=11
    )
    batches = list(pb.iterate(epoch=2))
    seen = []
    for b in batches:
        B, S = b["src"].shape
        T = b["tgt_in"].shape[1]
        assert b["tgt_out"].shape == (B, T)
        assert max(S, T) * B <= 256 or B == 1
        assert torch.equal(b["lengths"], b["tgt_lengths"])
        assert int(b["src_lengths"].max()) == S and int(b["tgt_lengths"].max()) == T
        for row in range(B):
            i = int(b["indices"][row])
            ns, nt = int(b["src_lengths"][row]), int(b["tgt_lengths"][row])
            assert b["src"][row, :ns].tolist() == src[i] + [3]
            assert b["tgt_in"][row, :nt].tolist() == [2] + tgt[i]
            assert b["tgt_out"][row, :nt].tolist() == tgt[i] + [3]
            assert (b["src"][row, ns:] == 0).all() and (b["tgt_in"][row, nt:] == 0).all()
            assert (b["tgt_out"][row, nt:] == 0).all()
        seen += b["indices"].tolist()
    assert sorted(seen) == list(range(200))
    k = 3
    resumed = list(pb.iterate(epoch=2, start=k))
    assert [r["indices"].tolist() for r in resumed] == [b["indices"].tolist() for b in batches[k:]]
    with pytest.raises(ValueError, match="empty source"):
        ParallelBatches([([], [4])], bos_id=2, eos_id=3, batch_size=2)


# ---------------------------------------------------------------------------------------------
# sentencepiece
# ---------------------------------------------------------------------------------------------
TINY = [
    "the cat sat on the mat",
    "a dog ate the food of the cat",
    "der hund frisst das futter",
    "die katze sitzt auf der matte",
    "the mat is red",
    "die matte ist rot",
] * 5


def test_sentencepiece_train_and_cache(tmp_path):
    t0 = time.perf_counter()
    tok = train_sentencepiece(TINY, 60, cache_dir=tmp_path)
    assert not tok.from_cache and tok.model_path.is_file()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len(tok) == tok.vocab_size == 60
    ids = tok.encode("the cat sat on the mat")
    assert all(isinstance(i, int) for i in ids) and 1 not in ids
    assert tok.decode(ids) == "the cat sat on the mat"
    assert tok.decode([2] + ids + [3, 0, 0]) == "the cat sat on the mat"
    pieces = tok.encode_pieces("die katze")
    assert tok.decode_pieces(pieces) == "die katze" and pieces[0].startswith("\u2581")
    assert tok.encode(["the cat", "die katze"]) == [tok.encode("the cat"), tok.encode("die katze")]
    mtime = tok.model_path.stat().st_mtime_ns
    again = train_sentencepiece(list(TINY), 60, cache_dir=tmp_path)
    assert again.from_cache and again.model_path == tok.model_path
    assert tok.model_path.stat().st_mtime_ns == mtime
    assert again.encode("the mat") == tok.encode("the mat")
    other = train_sentencepiece(TINY, 50, cache_dir=tmp_path)  # other settings: other file
    assert not other.from_cache and other.model_path != tok.model_path
    uni = train_sentencepiece(TINY, 30, model_type="unigram", cache_dir=tmp_path)
    assert uni.model_path not in (tok.model_path, other.model_path)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("the cat") == tok.encode("the cat")
    assert len(list(tmp_path.glob("*.model"))) == 3 and not list(tmp_path.glob(".tmp*"))
    with pytest.raises(ValueError, match="too large"):
        train_sentencepiece(TINY, 5000, cache_dir=tmp_path)
    assert not list(tmp_path.glob(".tmp*"))
    assert time.perf_counter() - t0 < 10


def test_parallel_batches_from_sentencepiece(tmp_path):
    tok = SentencePieceTokenizer.train(TINY, 60, cache_dir=tmp_path)
    pairs = [("the cat sat", "die katze sitzt"), ("the mat", "die matte")]
    pb = ParallelBatches.from_pairs(pairs, tok, batch_size=2)
    (b,) = list(pb)
    i = b["indices"].tolist().index(0)
    n = int(b["tgt_lengths"][i])
    assert tok.decode(b["tgt_out"][i, :n]) == "die katze sitzt"
    assert b["tgt_in"][i, 0] == tok.bos_id and b["tgt_out"][i, n - 1] == tok.eos_id


# ---------------------------------------------------------------------------------------------
# sources and readers
# ---------------------------------------------------------------------------------------------
def test_resolution_order_error_lists_every_place(tmp_path, monkeypatch):
    given, env = tmp_path / "given", tmp_path / "env"
    given.mkdir()
    (env / "ptb").mkdir(parents=True)
    (env / "ptb" / "ptb.train.txt").write_text(" a b\n")
    monkeypatch.setenv(DATA_ENV, str(env))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(CorpusNotFoundError) as err:
        read_ptb(given)
    assert time.perf_counter() - t0 < 5  # offline fails fast
    msg = str(err.value)
    order = [
        f"--data: {given / 'ptb'}: no such directory",
        f"--data: {given}: missing ptb.train.txt, ptb.valid.txt, ptb.test.txt",
        f"${DATA_ENV}: {env / 'ptb'}: missing ptb.valid.txt, ptb.test.txt",
        "Hugging Face hub 'ptb-text-only/ptb_text_only': skipped, offline (HF_HUB_OFFLINE=1)",
    ]
    pos = [msg.find(o) for o in order]
    assert all(p >= 0 for p in pos), msg
    assert pos == sorted(pos)
    assert len(err.value.tried) == 4  # --data: no ptb/ and no files; env: ptb/ lacks files; hub
    assert f"{env}: missing" not in msg  # a matching subfolder is reported, not its parent

    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(CorpusNotFoundError) as err:
        read_yahoo()
    assert "--data: not given" in str(err.value) and f"${DATA_ENV}: not set" in str(err.value)
    assert "no hub copy of 'yahoo' is known" in str(err.value)


def test_data_argument_wins_over_environment(tmp_path, monkeypatch):
    for root, text in (("a", " x y\n"), ("b", " z\n")):
        (tmp_path / root / "ptb").mkdir(parents=True)
        for s in ("train", "valid", "test"):
            (tmp_path / root / "ptb" / f"ptb.{s}.txt").write_text(text)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "b"))
    assert read_ptb(tmp_path / "a").train == [["x", "y"]]
    assert read_ptb().train == [["z"]]
    # --data may also name the corpus folder itself
    assert read_ptb(tmp_path / "a" / "ptb").valid == [["x", "y"]]
    src = locate("ptb", ["ptb.valid.txt"], data=tmp_path / "a")
    assert src.path == tmp_path / "a" / "ptb" and src.is_local


def test_hub_status_offline_and_unreachable(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ok, why = hub_status()
    assert not ok and "offline" in why
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # reserved TLD: never resolves
    t0 = time.perf_counter()
    ok, why = hub_status(timeout=2)
    assert not ok and "unreachable" in why and time.perf_counter() - t0 < 3


def test_read_parallel_gzip_and_alignment(tmp_path):
    with gzip.open(tmp_path / "a.de.gz", "wt") as f:
        f.write("Ein Hund .\n\nZwei Katzen .\n")
    (tmp_path / "a.en").write_text("A dog .\n\nTwo cats .\n")
    pairs = read_parallel(tmp_path / "a.de.gz", tmp_path / "a.en")
    assert pairs == [("Ein Hund .", "A dog ."), ("", ""), ("Zwei Katzen .", "Two cats .")]
    (tmp_path / "b.en").write_text("one\n")
    with pytest.raises(ValueError, match="not aligned"):
        read_parallel(tmp_path / "a.en", tmp_path / "b.en")


def test_read_lines_newlines_compression_and_missing_files(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a b\r\n\r\nc\rd \n  e")
    for ext, opener in ((".bz2", bz2.open), (".xz", lzma.open)):
        with opener(tmp_path / f"z.txt{ext}", "wt", encoding="utf-8") as f:
            f.write("eins\nzwei\u00e4\n")
    lines = read_lines({"crlf": tmp_path / "crlf.txt", "bz2": tmp_path / "z.txt.bz2", "xz": tmp_path / "z.txt.xz"})
    assert lines == {"crlf": ["a b", "", "c", "d ", "  e"], "bz2": ["eins", "zwei\u00e4"], "xz": ["eins", "zwei\u00e4"]}
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_lines({"x": tmp_path / "nope.txt"})


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Point every cache a reader could write to (HOME, XDG, Hugging Face, latentnlp) at empty
    folders; returns them so a test can check they stay empty."""
    roots = {name: tmp_path / name for name in ("home", "xdg", "hf", "hf-datasets", "latentnlp")}
    for root in roots.values():
        root.mkdir()
    for var, name in (
        ("HOME", "home"),
        ("XDG_CACHE_HOME", "xdg"),
        ("HF_HOME", "hf"),
        ("HF_DATASETS_CACHE", "hf-datasets"),
        ("LATENTNLP_CACHE", "latentnlp"),
    ):
        monkeypatch.setenv(var, str(roots[name]))
    return roots


def _local_corpora(root):
    (root / "ptb").mkdir()
    for s in ("train", "valid", "test"):
        (root / "ptb" / f"ptb.{s}.txt").write_text(" the cat\n a dog <unk>\n")
    (root / "multi30k" / "raw").mkdir(parents=True)
    for split in ("train", "val", "test_2016_flickr"):
        for lang, text in (("de", "Ein Hund .\n"), ("en", "A dog .\n")):
            with gzip.open(root / "multi30k" / "raw" / f"{split}.{lang}.gz", "wt") as f:
                f.write(text)


def test_local_corpora_are_read_quietly_and_cache_nothing(tmp_path, isolated_caches, capfd):
    data = tmp_path / "data"
    data.mkdir()
    _local_corpora(data)
    capfd.readouterr()
    assert read_ptb(data).train == [["the", "cat"], ["a", "dog", "<unk>"]]
    assert read_multi30k(data, variant="raw").valid == [("Ein Hund .", "A dog .")]
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no progress bar, no log line
    for name, root in isolated_caches.items():
        assert not any(root.rglob("*")), f"{name} cache written: {sorted(root.rglob('*'))}"
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == sorted(
        [f"ptb.{s}.txt" for s in ("train", "valid", "test")]
        + [f"{s}.{lang}.gz" for s in ("train", "val", "test_2016_flickr") for lang in ("de", "en")]
    )


@needs_data
def test_shared_corpora_are_read_quietly_and_cache_nothing(isolated_caches, capfd):
    capfd.readouterr()
    read_ptb()
    read_multi30k(variant="raw")
    with pytest.warns(MissingSplitWarning):
        read_iwslt14()
    with pytest.warns(MissingSplitWarning):
        read_yahoo().vocabulary()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    for name, root in isolated_caches.items():
        assert not any(root.rglob("*")), f"{name} cache written: {sorted(root.rglob('*'))}"


def test_sentencepiece_training_prints_nothing(tmp_path, capfd):
    capfd.readouterr()
    train_sentencepiece(TINY, 40, cache_dir=tmp_path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------------------------------------
# the real corpora (shared/data)
# ---------------------------------------------------------------------------------------------
@needs_data
def test_ptb_vocabulary_and_token_counts():
    ptb = read_ptb()
    vocab = ptb.vocabulary()
    assert len(vocab) == 10_000 and vocab.eos == "<eos>" and vocab.unk == "<unk>"
    counts = {"train": (42_068, 929_589), "valid": (3_370, 73_760), "test": (3_761, 82_430)}
    for split, (lines, with_eos) in counts.items():
        assert len(ptb[split]) == lines
        assert ptb.num_tokens(split) == with_eos
        stream = lm_stream(ptb[split], vocab)
        assert stream.numel() == with_eos
        if split != "train":  # valid and test have no types missing from train
            assert all(t in vocab for sent in ptb[split] for t in sent)
    test = BPTTStream.from_sentences(ptb.test, vocab, 1, 1000, prepend_eos=True)
    assert test.num_tokens == 82_430


@needs_data
def test_multi30k_and_iwslt_line_counts():
    m = read_multi30k(extra_splits=["test_2017_mscoco"])
    assert {k: len(v) for k, v in m.splits.items()} == {
        "train": 29_000,
        "valid": 1_014,
        "test": 1_000,
        "test_2017_mscoco": 461,
    }
    assert sum(len(s.split()) for s, _ in m.train) == 360_706  # de
    assert sum(len(t.split()) for _, t in m.train) == 377_534  # en
    raw = read_multi30k(variant="raw", src="en", tgt="de")
    assert len(raw.valid) == 1_014 and raw.valid[0][0][0].isupper()

    with pytest.warns(MissingSplitWarning, match="train"):
        iw = read_iwslt14()
    assert len(iw.valid) == 7_282 and len(iw.test) == 6_750
    assert sum(len(s.split()) for s, _ in iw.test) == 125_738
    with pytest.raises(MissingSplitError, match="train.de"):
        iw.train


@needs_data
def test_yahoo_without_train():
    with pytest.warns(MissingSplitWarning, match="yahoo.train.txt"):
        y = read_yahoo()
    assert len(y.valid) == len(y.test) == 10_000
    assert sum(len(d) for d in y.valid) == 790_680
    v = y.vocabulary()
    assert len(v) == 20_000 and (v.pad_id, v.bos_id, v.eos_id, v.unk_id) == (0, 1, 2, 3)
    assert all(t in v for d in y.test for t in d)


def test_portable_path_names_the_data_directory_and_home_not_the_machine(tmp_path, monkeypatch):
    from latentnlp.data import portable_path

    data = tmp_path / "data"
    (data / "ptb").mkdir(parents=True)
    monkeypatch.setenv("LATENTNLP_DATA", str(data))
    assert portable_path(data / "ptb") == "$LATENTNLP_DATA/ptb"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".cache").mkdir(parents=True)
    assert portable_path(tmp_path / "home" / ".cache" / "m.model") == "~/.cache/m.model"
    assert portable_path("/elsewhere/x") == "/elsewhere/x"
