"""SIGMORPHON 2016 morphological reinflection, task 3 (Cotterell et al. 2016).

One example per line, three tab-separated columns::

    source_form <TAB> target_tags <TAB> target_form
    aalten      <TAB> pos=V,mood=IND,tense=PRS,per=3,num=PL <TAB> aalen

The tags are comma-separated ``feature=value`` pairs, each feature at most once.  Task 3 gives
the source form without its tags: a model inflects an unanalysed form into the target tags.

A :class:`TagInventory` is built on the training split: the features seen and, for each, its
values.  A tag set is encoded as one index per feature, ``0`` for a feature the set does not
mention ("absent") and ``1 + j`` for the feature's ``j``-th value, so feature ``i`` is a
categorical over ``1 + len(values[i])`` categories (:attr:`TagInventory.sizes`).  Development and
test files are read against the training inventory: a feature it does not hold is a
``ValueError`` naming the file and line; so is an unseen value of a known feature, unless
``unseen_values="absent"`` (a few test sets hold values no training line has, e.g. Russian
``case=VOC``), which reads the value as absent and counts the lines where that happened.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SIGMORPHON_LANGUAGES",
    "Reinflection",
    "ReinflectionExample",
    "TagInventory",
    "parse_tags",
    "read_reinflection",
    "read_task3",
]

#: the ten languages of the 2016 shared task
SIGMORPHON_LANGUAGES = (
    "arabic",
    "finnish",
    "georgian",
    "german",
    "hungarian",
    "maltese",
    "navajo",
    "russian",
    "spanish",
    "turkish",
)

UNSEEN_VALUES = ("error", "absent")


@dataclass(frozen=True)
class ReinflectionExample:
    """One line: ``source`` form, target ``tags`` (feature -> value) and ``target`` form.

    ``line`` is the 1-based line number in the file it was read from (0 when built in code).
    """

    source: str
    tags: Mapping[str, str]
    target: str
    line: int = 0


def parse_tags(text: str, *, where: str = "tags") -> dict[str, str]:
    """``"pos=V,num=PL"`` -> ``{"pos": "V", "num": "PL"}``.

    A pair without ``=``, an empty feature or value, or a feature given twice is a ``ValueError``
    naming ``where`` (a file and line, say).
    """
    tags: dict[str, str] = {}
    for pair in text.split(","):
        feature, sep, value = pair.partition("=")
        if not sep or not feature or not value:
            raise ValueError(f"{where}: tag {pair!r} is not feature=value (tags {text!r})")
        if feature in tags:
            raise ValueError(f"{where}: feature {feature!r} appears twice (tags {text!r})")
        tags[feature] = value
    return tags


@dataclass(frozen=True)
class TagInventory:
    """The features of a training set and each feature's values, in order of first appearance.

    ``features[i]`` has ``values[features[i]]``; :meth:`encode` gives index ``0`` to an absent
    feature and ``1 + j`` to value ``j``.
    """

    features: tuple[str, ...]
    values: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(cls, tag_sets: Iterable[Mapping[str, str]]) -> TagInventory:
        """The inventory of ``tag_sets`` (the training examples' tags)."""
        values: dict[str, list[str]] = {}
        for tags in tag_sets:
            for feature, value in tags.items():
                seen = values.setdefault(feature, [])
                if value not in seen:
                    seen.append(value)
        return cls(tuple(values), {f: tuple(v) for f, v in values.items()})

    @property
    def sizes(self) -> list[int]:
        """Categories of each feature: ``1 + len(values)`` ("absent" first)."""
        return [1 + len(self.values[f]) for f in self.features]

    def unknown(self, tags: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """The features of ``tags`` not in the inventory, and the ``feature=value`` pairs of known
        features whose value is not."""
        features = [f for f in tags if f not in self.values]
        values = [f"{f}={v}" for f, v in tags.items() if f in self.values and v not in self.values[f]]
        return features, values

    def encode(self, tags: Mapping[str, str], *, unseen_values: str = "error") -> list[int]:
        """One index per feature of the inventory: ``0`` absent, ``1 + j`` the ``j``-th value.

        An unknown feature is a ``ValueError``; an unknown value too, or absent with
        ``unseen_values="absent"``.
        """
        if unseen_values not in UNSEEN_VALUES:
            raise ValueError(f"unseen_values must be one of {UNSEEN_VALUES}, got {unseen_values!r}")
        features, values = self.unknown(tags)
        if features or (values and unseen_values == "error"):
            raise ValueError(
                f"tags {dict(tags)} hold features {features} / values {values} not in the inventory "
                f"(features {list(self.features)})"
            )
        out = []
        for feature in self.features:
            value = tags.get(feature)
            known = self.values[feature]
            out.append(known.index(value) + 1 if value in known else 0)
        return out

    def decode(self, indices: Sequence[int]) -> dict[str, str]:
        """The tag set of :meth:`encode`'s indices (absent features left out)."""
        if len(indices) != len(self.features):
            raise ValueError(f"indices must hold {len(self.features)} entries (one a feature), got {len(indices)}")
        return {f: self.values[f][i - 1] for f, i in zip(self.features, indices) if i > 0}

    def to_dict(self) -> dict:
        """JSON-ready: ``{"features": [...], "values": {feature: [...]}}``."""
        return {"features": list(self.features), "values": {f: list(v) for f, v in self.values.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> TagInventory:
        return cls(tuple(data["features"]), {f: tuple(data["values"][f]) for f in data["features"]})


def _check_against(inventory: TagInventory, tags: Mapping[str, str], where: str, unseen_values: str) -> bool:
    """Raise for features (and, under ``"error"``, values) outside ``inventory``; True when some
    value is unseen (read as absent)."""
    features, values = inventory.unknown(tags)
    if features:
        raise ValueError(
            f"{where}: feature(s) {features} do not occur in the training data "
            f"(training features: {list(inventory.features)})"
        )
    if values and unseen_values == "error":
        raise ValueError(
            f"{where}: value(s) {values} do not occur in the training data; "
            "pass unseen_values='absent' to read them as absent"
        )
    return bool(values)


def read_task3(
    path: str | os.PathLike,
    inventory: TagInventory | None = None,
    *,
    unseen_values: str = "error",
) -> tuple[list[ReinflectionExample], int]:
    """The examples of one task-3 file, and how many lines hold a value unseen in ``inventory``.

    Every line must have three tab-separated, non-empty columns (``ValueError`` naming the file and
    line otherwise); blank lines are skipped.  With ``inventory`` (the training one), features and
    values are checked against it as the module docstring says.
    """
    if unseen_values not in UNSEEN_VALUES:
        raise ValueError(f"unseen_values must be one of {UNSEEN_VALUES}, got {unseen_values!r}")
    examples, unseen = [], 0
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            columns = line.split("\t")
            if len(columns) != 3 or not all(columns):
                raise ValueError(
                    f"{where}: expected source_form<TAB>feature=value,...<TAB>target_form, got {len(columns)} "
                    f"column(s): {line!r}"
                )
            source, tag_text, target = columns
            tags = parse_tags(tag_text, where=where)
            if inventory is not None:
                unseen += _check_against(inventory, tags, where, unseen_values)
            examples.append(ReinflectionExample(source, tags, target, number))
    return examples, unseen


@dataclass
class Reinflection:
    """One language's task-3 splits, with the inventory of its training tags.

    ``unseen_value_lines[split]`` counts the lines read with a value unseen in training (read as
    absent; only under ``unseen_values="absent"``).
    """

    language: str
    train: list[ReinflectionExample]
    dev: list[ReinflectionExample]
    test: list[ReinflectionExample]
    inventory: TagInventory
    unseen_value_lines: dict[str, int] = field(default_factory=dict)

    def forms(self, splits: Sequence[str] = ("train", "dev")) -> list[str]:
        """The distinct word forms of the source and target columns of ``splits`` (tags dropped), in
        order of first appearance: the unlabelled words of semi-supervised training."""
        seen: dict[str, None] = {}
        for split in splits:
            for ex in getattr(self, split):
                seen.setdefault(ex.source)
                seen.setdefault(ex.target)
        return list(seen)


def read_reinflection(root: str | os.PathLike, language: str, *, unseen_values: str = "error") -> Reinflection:
    """``{root}/{language}-task3-{train,dev,test}``, the development and test files checked against
    the training inventory (see the module docstring)."""
    root = Path(root)
    paths = {split: root / f"{language}-task3-{split}" for split in ("train", "dev", "test")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"SIGMORPHON 2016 task-3 files missing for {language!r}: {missing}")
    train, _ = read_task3(paths["train"])
    inventory = TagInventory.build(ex.tags for ex in train)
    dev, dev_unseen = read_task3(paths["dev"], inventory, unseen_values=unseen_values)
    test, test_unseen = read_task3(paths["test"], inventory, unseen_values=unseen_values)
    return Reinflection(language, train, dev, test, inventory, {"dev": dev_unseen, "test": test_unseen})
