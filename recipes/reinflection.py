"""Semi-supervised morphological reinflection with MSVED (Zhou & Neubig 2017), SIGMORPHON 2016 task 3.

    python recipes/reinflection.py --preset smoke            # seconds, on generated morphology
    python recipes/reinflection.py --preset cpu              # German and Turkish, about an hour on 2 cores
    python recipes/reinflection.py --preset full             # all ten languages (a GPU)

Task 3 inflects an unanalysed word form into target tags (``$LATENTNLP_DATA/sigmorphon2016``,
read by :func:`latentnlp.data.read_reinflection`).  Three rows per language, each trained by the
library's :class:`~latentnlp.training.Trainer` on ``-task3-train``, selected on ``-task3-dev`` and
decoded by beam search on ``-task3-test``:

* ``msved-sup``: :class:`~latentnlp.models.MultiSpaceVAE` on the labelled data only: every training
  triple as a reinflection row (the source form encoded to ``z``, the target form decoded from ``z``
  and the target tags) and every target form with its tags as a labelled auto-encoding row;
* ``msved-semi``: the same plus unlabelled rows, the distinct forms of the training and development
  source and target columns with their tags dropped (the tags latent, summed by straight-through
  Gumbel-softmax), and any untagged forms given with ``--unlabelled FILE`` (one a line): each
  update's batch of labelled rows, the supervised row's, followed by as many unlabelled ones;
* ``encdec``: a plain character-level attention encoder-decoder
  (:class:`~latentnlp.models.latent_alignment.LatentAlignmentSeq2Seq`, soft attention) reading the
  target tags as input tokens before the source characters, trained by its likelihood.

MSVED is trained on its ELBO with the KL weight warmed up from 0 to the preset's ``kl_max``
(``LinearWarmup``; below 1 the surrogate is a KL-down-weighted bound, which keeps the lemma in
``z`` where a full-weight KL collapses it early in training) and the Gumbel temperature annealed,
through the trainer's schedules, and selected on the development bound (the true ELBO, weight 1);
the encoder-decoder on its likelihood.  ``--estimator score_function`` trains the MSVED rows with
the score-function estimator and a learned baseline instead of straight-through Gumbel-softmax.
Test numbers: exact-match accuracy and mean Levenshtein distance between the predicted and the
gold target form.  ``smoke`` generates its
own morphology (``<out>/data``): stems of consonant-vowel syllables, nouns inflected for case and
number and verbs for tense, person and number by suffixes; test pairs (source tags, target tags)
are unseen in training, their lemmas are not.

Each row gets its own folder (``config.json``, ``metrics.jsonl``, ``last.pt``/``best.pt``,
``finished.json`` from the trainer, which resumes an interrupted run; ``eval.json`` and
``test.hyp`` from the recipe); a finished run is reused unless ``--overwrite``.  The output
folder gathers ``results.md`` (measured table, published references, checks), ``metrics.jsonl``
(one line per row), ``config.json`` and training-curve PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentnlp import plots  # noqa: E402
from latentnlp.data import (  # noqa: E402
    SIGMORPHON_LANGUAGES,
    CorpusNotFoundError,
    Reinflection,
    ReinflectionExample,
    TagInventory,
    Vocabulary,
    epoch_generator,
    find_local,
    portable_path,
    read_reinflection,
)
from latentnlp.models import MultiSpaceVAE  # noqa: E402
from latentnlp.models.latent_alignment import LatentAlignmentSeq2Seq  # noqa: E402
from latentnlp.models.multi_space_vae import ESTIMATORS  # noqa: E402
from latentnlp.schedules import LinearWarmup  # noqa: E402
from latentnlp.training import TrainConfig, Trainer, training_speed  # noqa: E402

ROWS = ("msved-sup", "msved-semi", "encdec")
ROW_NAMES = {
    "msved-sup": "MSVED, supervised",
    "msved-semi": "MSVED, semi-supervised",
    "encdec": "attention encoder-decoder (tags as tokens)",
}
SPECIALS = {"pad": "<pad>", "bos": "<w>", "eos": "</w>", "unk": "<unk>"}

# Published task-3 exact-match accuracy (%, full test sets) of the SIGMORPHON 2016 shared task, as
# the organisers' results page lists it: github.com/ryancotterell/sigmorphon2016, branch gh-pages,
# index.html (last changed 2016-08-17), tables "Track 2 Task 3: Accuracy" and "Track 1 Task 3:
# Accuracy".  Per language, the first-ranked system (LMU-1, Kann & Schuetze's MED, an attention
# encoder-decoder) and the best system of another team.  Track 2 is the restricted track, the task's
# own training data only, which is this recipe's setting; track 1 (standard) allows more of the
# released data.  Zhou & Neubig (2017) report MSVED per language too; their table could not be
# consulted when this was written (their code's README lists no number), so none is listed.
SHARED_TASK_SOURCE = (
    "SIGMORPHON 2016 shared task results page (Cotterell et al. 2016), "
    "github.com/ryancotterell/sigmorphon2016 branch gh-pages, index.html, 2016-08-17"
)
SHARED_TASK_TASK3 = {
    "track 2 (restricted)": {
        "arabic": (("LMU-1", 82.8), ("HEL", 70.43)),
        "finnish": (("LMU-1", 93.18), ("HEL", 87.55)),
        "georgian": (("LMU-1", 96.21), ("BIU/MIT-1", 92.08)),
        "german": (("LMU-1", 92.41), ("BIU/MIT-1", 89.58)),
        "hungarian": (("LMU-1", 98.37), ("HEL", 96.46)),
        "maltese": (("LMU-1", 84.25), ("HEL", 75.54)),
        "navajo": (("LMU-1", 83.5), ("HEL", 83.21)),
        "russian": (("LMU-1", 87.13), ("HEL", 84.59)),
        "spanish": (("LMU-1", 96.69), ("HEL", 94.85)),
        "turkish": (("LMU-1", 95.0), ("HEL", 91.25)),
    },
    "track 1 (standard)": {
        "arabic": (("LMU-1", 96.52), ("МГУ", 80.57)),
        "finnish": (("LMU-1", 96.56), ("UA", 85.77)),
        "georgian": (("LMU-1", 98.87), ("UA", 94.13)),
        "german": (("LMU-1", 95.6), ("МГУ", 91.99)),
        "hungarian": (("LMU-1", 99.5), ("МГУ", 90.41)),
        "maltese": (("LMU-1", 87.83), ("UA", 37.5)),
        "navajo": (("LMU-1", 96.2), ("COL/NYU", 84.38)),
        "russian": (("LMU-1", 89.91), ("МГУ", 86.59)),
        "spanish": (("LMU-1", 97.96), ("МГУ", 97.3)),
        "turkish": (("LMU-1", 99.31), ("МГУ", 92.44)),
    },
}


@dataclass
class Preset:
    """How one preset reads data, builds the three rows and trains them."""

    languages: list[str]  # ["generated"] for smoke
    msved: dict  # MultiSpaceVAE keyword arguments
    encdec: dict  # LatentAlignmentSeq2Seq.from_mode keyword arguments
    batch_size: int
    train: dict  # TrainConfig fields shared by the rows
    kl_warmup: int  # updates over which the KL weight rises from 0 to kl_max
    kl_max: float  # the KL weight after the warm-up (1: the ELBO itself)
    tau: tuple[float, float]  # Gumbel temperature annealed from the first to the second over kl_warmup
    row_train: dict = field(default_factory=dict)  # per-row TrainConfig overrides
    beam_size: int = 5
    decode_limit: int | None = None  # decode at most this many test examples


PRESETS = {
    "smoke": Preset(
        languages=["generated"],
        msved={"embedding_size": 32, "hidden_size": 64, "latent_size": 16, "tag_dim": 16},
        encdec={"embedding_size": 32, "hidden_size": 64},
        batch_size=32,
        train={"max_epochs": 8, "lr": 1e-2, "grad_clip": 5.0, "log_every": 20},
        kl_warmup=100,
        kl_max=0.1,
        tau=(1.0, 0.5),
        beam_size=3,
    ),
    # about an hour on 2 CPU cores for the six rows (German and Turkish).  Measured on German with
    # 2 free threads: an MSVED update of 64 rows takes 0.14 s (a 900-update row, decoding included,
    # took 140 s and reached 10% test accuracy: far from trained), so each MSVED row gets 3,000
    # updates (about 8 epochs of the German labelled rows, 7 minutes) and the encoder-decoder,
    # whose update attends over tags and characters, 1,500; beam search over the first 2,000 test
    # examples adds under a minute a row.
    "cpu": Preset(
        languages=["german", "turkish"],
        msved={"embedding_size": 64, "hidden_size": 128, "latent_size": 64, "tag_dim": 64, "dropout": 0.2},
        encdec={"embedding_size": 64, "hidden_size": 128, "dropout": 0.2},
        batch_size=64,
        train={
            "max_epochs": 30,
            "max_steps": 3000,
            "lr": 2e-3,
            "grad_clip": 5.0,
            "log_every": 50,
            "eval_every": 300,
            "checkpoint_every": 300,
        },
        row_train={"encdec": {"max_steps": 1500}},
        kl_warmup=1500,
        kl_max=0.1,
        tau=(1.0, 0.5),
        beam_size=5,
        decode_limit=2000,
    ),
    # all ten languages, larger models trained to convergence (a GPU)
    "full": Preset(
        languages=list(SIGMORPHON_LANGUAGES),
        msved={"embedding_size": 300, "hidden_size": 256, "latent_size": 150, "tag_dim": 200, "dropout": 0.3},
        encdec={"embedding_size": 300, "hidden_size": 512, "dropout": 0.3},
        batch_size=64,
        train={
            "max_epochs": 60,
            "lr": 1e-3,
            "grad_clip": 5.0,
            "log_every": 200,
            "eval_every": 2000,
            "checkpoint_every": 2000,
            "patience": 8,
        },
        kl_warmup=20000,
        kl_max=0.1,
        tau=(1.0, 0.5),
        beam_size=10,
    ),
}


# ---- generated morphology (smoke) ----------------------------------------------------------------
NOUN = {"case": {"NOM": "", "ACC": "em", "DAT": "ix", "GEN": "os"}, "num": {"SG": "", "PL": "ur"}}
VERB = {"tense": {"PRS": "", "PST": "ed"}, "per": {"1": "o", "2": "as", "3": "it"}, "num": {"SG": "", "PL": "n"}}


def _inflect(stem: str, tags: dict[str, str]) -> str:
    """Suffixes in a fixed order: nouns ``stem + num + case``, verbs ``stem + tense + per + num``."""
    table = NOUN if tags["pos"] == "N" else VERB
    order = ("num", "case") if tags["pos"] == "N" else ("tense", "per", "num")
    return stem + "".join(table[f][tags[f]] for f in order)


def _random_tags(rng: random.Random, pos: str) -> dict[str, str]:
    table = NOUN if pos == "N" else VERB
    return {"pos": pos, **{f: rng.choice(sorted(v)) for f, v in table.items()}}


def _stem(rng: random.Random) -> str:
    syllables = rng.randint(1, 2)
    return "".join(rng.choice("bdgklmnprstv") + rng.choice("aeiu") for _ in range(syllables)) + rng.choice("bdgkmt")


def generate_language(seed: int, lemmas: int, pairs: dict[str, int]) -> dict[str, list]:
    """``{split: [(source, tags, target)]}`` over ``lemmas`` random stems: ``pairs[split]`` random
    (source tags, target tags) pairs per lemma, no test or dev pair repeating a training one; the
    ``unlabelled`` split holds forms of the same lemmas (its tags are not used)."""
    rng = random.Random(seed)
    stems: list[str] = []
    while len(stems) < lemmas:
        s = _stem(rng)
        if s not in stems:
            stems.append(s)
    out: dict[str, list] = {split: [] for split in pairs}
    for stem in stems:
        pos, seen = rng.choice("NV"), set()
        for split, n in pairs.items():
            made = 0
            for _ in range(100 * n):
                if made == n:
                    break
                source, target = _random_tags(rng, pos), _random_tags(rng, pos)
                key = (tuple(source.values()), tuple(target.values()))
                if split != "unlabelled" and key in seen:
                    continue
                seen.add(key)
                out[split].append((_inflect(stem, source), target, _inflect(stem, target)))
                made += 1
    return out


def write_generated(folder: Path, seed: int) -> Path:
    """The smoke language as task-3 files ``generated-task3-{train,dev,test}`` and ``unlabelled.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = generate_language(seed, 30, {"train": 5, "dev": 1, "test": 2, "unlabelled": 3})
    for split in ("train", "dev", "test"):
        lines = [f"{s}\t{','.join(f'{k}={v}' for k, v in t.items())}\t{x}\n" for s, t, x in data[split]]
        (folder / f"generated-task3-{split}").write_text("".join(lines), encoding="utf-8")
    (folder / "unlabelled.txt").write_text("".join(f"{s}\n" for s, _, _ in data["unlabelled"]), encoding="utf-8")
    return folder


# ---- batches -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One training or evaluation row: the encoded form, the tags (None: unlabelled), the decoded form."""

    source: str
    tags: dict | None
    target: str


class ReinflectionBatches:
    """Rows in batches with the trainer's data protocol (``__len__``, ``iterate(epoch, start)``).

    ``layout="msved"`` gives :class:`~latentnlp.models.MultiSpaceVAE` batches (``src``, ``inputs``,
    ``targets``, ``tags``, ``labelled``...); ``layout="encdec"`` gives seq2seq batches whose source
    is the tag tokens followed by the source characters.  The order of an epoch is a function of
    ``(seed, epoch)`` (shuffled) or the given order (``shuffle=False``).  With ``unlabelled`` rows
    each batch of ``batch_size`` rows is followed by as many unlabelled ones, taken in turn from
    their own shuffled order (restarted as needed): the labelled rows an update sees are those
    of the same batch without them, and the unlabelled ones come on top (an epoch is a pass over
    the labelled rows).
    """

    def __init__(
        self,
        rows: list[Row],
        chars: Vocabulary,
        inventory: TagInventory,
        layout: str,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        tag_tokens: Vocabulary | None = None,
        unlabelled: list[Row] | None = None,
    ) -> None:
        self.rows, self.chars, self.inventory, self.layout = rows, chars, inventory, layout
        self.batch_size, self.shuffle, self.seed, self.tag_tokens = batch_size, shuffle, seed, tag_tokens
        self.unlabelled = unlabelled or []
        self._order_of_cycle: tuple[int | None, list[int]] = (None, [])

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        return torch.randperm(len(self.rows), generator=epoch_generator(self.seed, epoch)).tolist()

    def _unlabelled_chunk(self, epoch: int, b: int) -> list[Row]:
        """Batch ``b``'s unlabelled rows: positions ``b * batch_size ...`` of the unlabelled rows' orders
        (one shuffled order per pass over them, seeded by the pass's number), so that every update
        gets ``batch_size`` of them and an epoch resumed at ``b`` gets the same ones."""
        n = len(self.unlabelled)
        chunk = []
        for position in range((epoch * len(self) + b) * self.batch_size, (epoch * len(self) + b + 1) * self.batch_size):
            cycle, at = divmod(position, n)
            chunk.append(self.unlabelled[self._unlabelled_order(cycle)[at]])
        return chunk

    def _unlabelled_order(self, cycle: int) -> list[int]:
        """The shuffled order of the unlabelled rows in pass ``cycle`` over them (the last one kept)."""
        if self._order_of_cycle[0] != cycle:
            order = torch.randperm(len(self.unlabelled), generator=epoch_generator(self.seed + 1, cycle)).tolist()
            self._order_of_cycle = (cycle, order)
        return self._order_of_cycle[1]

    def iterate(self, epoch: int = 0, start: int = 0):
        order = self.order(epoch)
        for b in range(start, len(self)):
            rows = [self.rows[i] for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            yield self.collate(rows + (self._unlabelled_chunk(epoch, b) if self.unlabelled else []))

    def __iter__(self):
        return self.iterate(0)

    def _chars(self, text: str) -> list[int]:
        return self.chars.encode(list(text))

    def collate(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        pad = self.chars.pad_id
        targets = [self._chars(r.target) + [self.chars.eos_id] for r in rows]
        inputs = [[self.chars.bos_id] + t[:-1] for t in targets]
        tags = [self.inventory.encode(r.tags or {}, unseen_values="absent") for r in rows]
        if self.layout == "msved":
            src = [self._chars(r.source) for r in rows]
            return {
                "src": _pad(src, pad),
                "src_lengths": torch.tensor([len(s) for s in src]),
                "inputs": _pad(inputs, pad),
                "targets": _pad(targets, pad),
                "lengths": torch.tensor([len(t) for t in targets]),
                "tags": torch.tensor(tags),
                "labelled": torch.tensor([r.tags is not None for r in rows]),
            }
        assert self.tag_tokens is not None
        src = [self.tag_tokens.encode(tag_tokens(r.tags or {})) + self._chars(r.source) for r in rows]
        return {
            "src": _pad(src, pad),
            "src_lengths": torch.tensor([len(s) for s in src]),
            "tgt_in": _pad(inputs, pad),
            "tgt_out": _pad(targets, pad),
            "tgt_lengths": torch.tensor([len(t) for t in targets]),
        }


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


def tag_tokens(tags: dict) -> list[str]:
    """The encoder-decoder's tag input: one token ``feature=value`` a tag."""
    return [f"{f}={v}" for f, v in tags.items()]


@dataclass
class Language:
    name: str
    data: Reinflection
    chars: Vocabulary  # characters of every split's forms, shared by both sides
    tag_tokens: Vocabulary  # chars + tag tokens (the encoder-decoder's source vocabulary)
    unlabelled: list[str]  # forms for msved-semi
    note: str


def load_language(name: str, preset_name: str, args, out: Path, seed: int) -> Language:
    if preset_name == "smoke":
        root = write_generated(out / "data", seed)
        extra = (root / "unlabelled.txt").read_text(encoding="utf-8").split()
        note = f"generated morphology ({portable_path(root)}), seed {seed}"
    else:
        required = [f"{name}-task3-{s}" for s in ("train", "dev", "test")]
        source, tried = find_local("sigmorphon2016", required, data=args.data)
        if source is None:
            raise CorpusNotFoundError("SIGMORPHON 2016 task 3 not found:\n  " + "\n  ".join(tried), tried)
        root = source.path
        extra = []
        note = f"{source.describe()}/{name}-task3-{{train,dev,test}}"
    if args.unlabelled:
        extra += Path(args.unlabelled).read_text(encoding="utf-8").split()
    data = read_reinflection(root, name, unseen_values="absent")
    unlabelled = list(dict.fromkeys(data.forms(("train", "dev")) + extra))
    # every character a test form holds too: an unseen character could never be produced
    forms = [list(f) for split in (data.train, data.dev, data.test) for e in split for f in (e.source, e.target)]
    chars = Vocabulary.build(forms + [list(f) for f in extra], **SPECIALS)
    tags = sorted({t for e in data.train for t in tag_tokens(e.tags)})
    return Language(name, data, chars, Vocabulary(chars.itos + tags, **SPECIALS), unlabelled, note)


def training_rows(lang: Language, row: str) -> list[Row]:
    """The labelled rows of ``row``: the training triples, and for MSVED each target form auto-encoded
    with its tags."""
    labelled = [Row(e.source, dict(e.tags), e.target) for e in lang.data.train]
    if row == "encdec":
        return labelled
    return labelled + [Row(e.target, dict(e.tags), e.target) for e in lang.data.train]


def unlabelled_rows(lang: Language, row: str) -> list[Row] | None:
    """The untagged forms auto-encoded with their tags latent (``msved-semi`` only; else None)."""
    return [Row(f, None, f) for f in lang.unlabelled] if row == "msved-semi" else None


def eval_rows(examples: list[ReinflectionExample]) -> list[Row]:
    return [Row(e.source, dict(e.tags), e.target) for e in examples]


# ---- models and training ---------------------------------------------------------------------------
def build_model(row: str, preset: Preset, lang: Language, estimator: str = "gumbel_softmax"):
    chars = lang.chars
    if row == "encdec":
        return LatentAlignmentSeq2Seq.from_mode(
            "soft", len(lang.tag_tokens), len(chars), bos_id=chars.bos_id, eos_id=chars.eos_id, **preset.encdec
        )
    return MultiSpaceVAE(
        len(chars),
        lang.data.inventory.sizes,
        bos_id=chars.bos_id,
        eos_id=chars.eos_id,
        tau=preset.tau[0],
        estimator=estimator,
        **preset.msved,
    )


def train_config(row: str, preset: Preset, args, run_dir: Path, seed: int) -> TrainConfig:
    fields = {**preset.train, **preset.row_train.get(row, {})}
    if row == "encdec":
        objective = {"objective": "marginal"}
    else:
        objective = {
            "objective": "elbo",
            "objective_kwargs": {
                "kl_weight": LinearWarmup(0.0, preset.kl_max, preset.kl_warmup),
                "tau": LinearWarmup(preset.tau[0], preset.tau[1], preset.kl_warmup),
            },
            "eval_kwargs": {},
        }
    config = TrainConfig(**fields, **objective, seed=seed, output_dir=str(run_dir))
    return config.with_arguments(args)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions at cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@torch.no_grad()
def predict(model, batches: ReinflectionBatches, beam_size: int, device) -> list[str]:
    model.eval()
    chars, out = batches.chars, []
    for batch in batches.iterate(0):
        batch = {k: v.to(device) for k, v in batch.items()}
        hyp = model.generate(batch, beam_size=beam_size)
        for row, n in zip(hyp.tokens.tolist(), hyp.lengths.tolist()):
            ids = [i for i in row[:n] if i not in (chars.eos_id, chars.pad_id, chars.bos_id)]
            out.append("".join(chars.itos[i] for i in ids))
    return out


def score(hypotheses: list[str], references: list[str]) -> dict:
    n = len(references)
    return {
        "examples": n,
        "accuracy": sum(h == r for h, r in zip(hypotheses, references)) / n,
        "levenshtein": sum(levenshtein(h, r) for h, r in zip(hypotheses, references)) / n,
    }


# ---- results ---------------------------------------------------------------------------------------
def checks(results: list[dict], preset_name: str) -> list[tuple[str, bool, str]]:
    found = []
    for lang in dict.fromkeys(r["language"] for r in results):
        acc = {r["row"]: r["test"]["accuracy"] for r in results if r["language"] == lang}
        if "msved-sup" in acc and "msved-semi" in acc:
            found.append(
                (
                    f"{lang}: semi-supervised MSVED accuracy >= supervised",
                    acc["msved-semi"] >= acc["msved-sup"],
                    f"{acc['msved-semi']:.3f} vs {acc['msved-sup']:.3f}",
                )
            )
        for msved in ("msved-semi", "msved-sup"):
            if msved in acc and "encdec" in acc:
                found.append(
                    (
                        f"{lang}: {ROW_NAMES[msved]} accuracy >= attention encoder-decoder",
                        acc[msved] >= acc["encdec"],
                        f"{acc[msved]:.3f} vs {acc['encdec']:.3f}",
                    )
                )
        if preset_name == "smoke":
            for row, a in acc.items():
                found.append((f"{lang}: {row} learns the generated morphology (accuracy > 0.5)", a > 0.5, f"{a:.3f}"))
    return found


def published_lines(languages: list[str]) -> list[str]:
    """The ``## Published`` section: the shared task's task-3 accuracy for the languages run."""
    tracks = list(SHARED_TASK_TASK3)
    known = [lang for lang in dict.fromkeys(languages) if lang in SHARED_TASK_TASK3[tracks[0]]]
    lines = ["## Published", ""]
    if not known:
        return lines + ["No published number exists for these languages (generated morphology).", ""]
    lines += [
        f"Task-3 exact-match accuracy on the full test sets, from the {SHARED_TASK_SOURCE}: per track "
        "the first-ranked system (LMU-1, Kann & Schuetze's MED, an attention encoder-decoder) and the "
        "best system of another team. The restricted track, the task's own training data only, is this "
        "recipe's setting. Zhou & Neubig (2017) report MSVED per language as well; their table could not "
        "be consulted here, so no MSVED number is listed.",
        "",
        "| language | " + " | ".join(f"{t}: first | {t}: another team" for t in tracks) + " |",
        "|---|" + "---:|---:|" * len(tracks),
    ]
    for lang in known:
        cells = [f"{acc / 100:.3f} ({team})" for t in tracks for team, acc in SHARED_TASK_TASK3[t][lang]]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_results(results: list[dict], preset_name: str, preset: Preset, notes: dict, out: Path, figures) -> None:
    lines = [
        f"# Morphological reinflection (SIGMORPHON 2016 task 3): preset `{preset_name}`",
        "",
        "Accuracy: exact match of the predicted target form; Levenshtein: mean edit distance to the "
        f"gold form. Beam search, beam {preset.beam_size}; MSVED decodes from the mean of q(z | source) "
        "and the target tags.",
        "",
    ]
    for lang, note in notes.items():
        lines.append(f"- {lang}: {note}")
    lines += [
        "",
        "## Measured",
        "",
        "| language | model | accuracy | Levenshtein | test examples | parameters | updates | train rows | "
        "train tokens/s | train time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = r["test"]
        lines.append(
            f"| {r['language']} | {r['label']} | {t['accuracy']:.3f} | {t['levenshtein']:.3f} | "
            f"{t['examples']:,} | {r['parameters']:,} | {r['steps']:,} | {r['train_rows']:,} | "
            f"{r['tokens_per_s']:.0f} | {r['wall_time']:.0f} |"
        )
    lines += [
        "",
        *published_lines([r["language"] for r in results]),
        "## Checks",
        "",
        "| expectation | result | measured |",
        "|---|---|---|",
    ]
    for name, passed, detail in checks(results, preset_name):
        lines.append(f"| {name} | {'pass' if passed else 'FAIL'} | {detail} |")
    if preset_name == "smoke":
        lines += [
            "",
            "The smoke language is generated (suffixal morphology, test pairs unseen in training); chance exact-match "
            "accuracy is about 0. Its numbers say only that every row trains, selects and decodes.",
        ]
    elif preset_name == "cpu":
        lines += [
            "",
            "The cpu models are smaller and trained far less than the published ones (see updates), and "
            f"the test set is cut to its first {preset.decode_limit:,} examples where it is longer.",
        ]
    lines += ["", "Plots: " + "; ".join(f"`{p}`" for p in figures) + ".", ""]
    (out / "results.md").write_text("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--language", action="append", help="languages to run (repeatable); default: the preset's")
    parser.add_argument("--row", action="append", choices=ROWS, help="rows to run (repeatable); default: all")
    parser.add_argument("--data", help="folder holding sigmorphon2016 (else $LATENTNLP_DATA)")
    parser.add_argument("--unlabelled", help="a file of further untagged word forms (one a line) for msved-semi")
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="gumbel_softmax",
        help="how MSVED estimates the expectation over latent tags (score_function: REINFORCE with a "
        "learned baseline); its runs then get their own folders, <row>-<estimator>",
    )
    parser.add_argument("--out", help="output folder (default runs/reinflection-<preset>)")
    TrainConfig.add_arguments(parser)
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    languages = args.language or preset.languages
    rows_wanted = list(dict.fromkeys(args.row or ROWS))
    out = Path(args.out or f"runs/reinflection-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else 0
    (out / "config.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "seed": seed,
                "languages": languages,
                "rows": rows_wanted,
                "msved": preset.msved,
                "encdec": preset.encdec,
                "batch_size": preset.batch_size,
                "train": preset.train,
                "kl_warmup": preset.kl_warmup,
                "kl_max": preset.kl_max,
                "tau": preset.tau,
                "beam_size": preset.beam_size,
                "decode_limit": preset.decode_limit,
                "unlabelled": portable_path(args.unlabelled) if args.unlabelled else None,
                "estimator": args.estimator,
            },
            indent=2,
        )
    )
    results, notes, figures = [], {}, []
    for name in languages:
        torch.manual_seed(seed)
        lang = load_language(name, args.preset, args, out, seed)
        test = lang.data.test[: preset.decode_limit] if preset.decode_limit else lang.data.test
        unseen = lang.data.unseen_value_lines["test"]
        notes[name] = (
            f"{lang.note}: {len(lang.data.train):,} train / {len(lang.data.dev):,} dev / {len(lang.data.test):,} "
            f"test triples, {len(lang.data.inventory.features)} features, {len(lang.chars)} characters, "
            f"{len(lang.unlabelled):,} unlabelled forms"
            + (f"; {unseen} test lines hold a tag value unseen in training (read as absent)" if unseen else "")
        )
        run_dirs = {}
        for row in rows_wanted:
            default = row == "encdec" or args.estimator == "gumbel_softmax"
            run_dir = out / name / (row if default else f"{row}-{args.estimator}")
            run_dirs[row] = run_dir
            layout = "encdec" if row == "encdec" else "msved"
            make = dict(chars=lang.chars, inventory=lang.data.inventory, layout=layout, tag_tokens=lang.tag_tokens)
            train = ReinflectionBatches(
                training_rows(lang, row),
                batch_size=preset.batch_size,
                shuffle=True,
                seed=seed,
                unlabelled=unlabelled_rows(lang, row),
                **make,
            )
            valid = ReinflectionBatches(eval_rows(lang.data.dev), batch_size=256, shuffle=False, **make)
            test_batches = ReinflectionBatches(eval_rows(test), batch_size=256, shuffle=False, **make)
            model = build_model(row, preset, lang, args.estimator)
            config = train_config(row, preset, args, run_dir, seed)
            parameters = sum(p.numel() for p in model.parameters())
            finished, evaluated = run_dir / "finished.json", run_dir / "eval.json"
            start = time.time()
            if finished.exists() and not config.overwrite:
                print(f"[{name}/{row}] finished run found in {run_dir}: reusing it (--overwrite to retrain)")
                summary = json.loads(finished.read_text())
            else:
                print(
                    f"[{name}/{row}] training {parameters:,} parameters on {len(train.rows):,} labelled rows"
                    + (f" and {len(train.unlabelled):,} unlabelled" if train.unlabelled else "")
                )
                evaluated.unlink(missing_ok=True)
                info = {"recipe": "reinflection", "preset": args.preset, "language": name, "row": row}
                summary = Trainer(model, config, train, valid, run_info=info).fit()
            model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["model"])
            cached = json.loads(evaluated.read_text()) if evaluated.exists() else {}
            if cached.get("beam_size") == preset.beam_size and cached.get("examples") == len(test):
                scores = cached["test"]
            else:
                device = Trainer(model, replace(config, output_dir=None, overwrite=False), train, valid).device
                hyps = predict(model, test_batches, preset.beam_size, device)
                (run_dir / "test.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
                scores = score(hyps, [e.target for e in test])
                evaluated.write_text(
                    json.dumps({"beam_size": preset.beam_size, "examples": len(test), "test": scores}, indent=2)
                )
            model.cpu()
            results.append(
                {
                    "language": name,
                    "row": row,
                    "label": ROW_NAMES[row] if default else f"{ROW_NAMES[row]} ({args.estimator})",
                    "dir": str(run_dir),
                    "parameters": parameters,
                    "steps": summary["steps"],
                    "train_rows": len(train.rows) + len(train.unlabelled),
                    "tokens_per_s": training_speed(run_dir),
                    "wall_time": summary["wall_time"],
                    "valid": summary["valid"],
                    "test": scores,
                }
            )
            print(
                f"[{name}/{row}] test accuracy {scores['accuracy']:.3f}, Levenshtein {scores['levenshtein']:.3f} "
                f"({time.time() - start:.0f}s)"
            )
        figure = f"curves-{name}.png"
        plots.training_curves(
            {ROW_NAMES[r]: d for r, d in run_dirs.items()},
            out / figure,
            loss_label="training loss per character",
            loss_title=f"{name}: training objective (-ELBO for MSVED, NLL for the encoder-decoder)",
            ppl_title="validation perplexity (encoder-decoder)",
        )
        figures.append(figure)
    with open(out / "metrics.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    write_results(results, args.preset, preset, notes, out, figures)
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
