"""The SIGMORPHON 2016 task-3 reader: small inline files, and the real ones when $LATENTNLP_DATA is set."""

import os
from pathlib import Path

import pytest

from latentnlp.data import (
    DATA_ENV,
    SIGMORPHON_LANGUAGES,
    TagInventory,
    parse_tags,
    read_reinflection,
    read_task3,
)

REAL = os.environ.get(DATA_ENV)
needs_data = pytest.mark.skipif(not REAL, reason=f"${DATA_ENV} not set")

TRAIN = (
    "aalten\tpos=V,mood=IND,tense=PRS,per=3,num=PL\taalen\n"
    "Hunde\tpos=N,case=GEN,num=SG\tHundes\n"
    "\n"
    "ging\tpos=V,tense=PST,num=SG\tgingen\n"
)


def _write(folder: Path, language: str, train: str, dev: str, test: str) -> Path:
    for split, text in (("train", train), ("dev", dev), ("test", test)):
        (folder / f"{language}-task3-{split}").write_text(text, encoding="utf-8")
    return folder


def test_parse_tags():
    assert parse_tags("pos=V,mood={SBJV/COND},per=3") == {"pos": "V", "mood": "{SBJV/COND}", "per": "3"}
    for bad in ("pos=V,num", "pos=V,=PL", "pos=", "pos=V,pos=N"):
        with pytest.raises(ValueError, match="here"):
            parse_tags(bad, where="here")


def test_three_columns_and_inventory(tmp_path):
    path = tmp_path / "x-task3-train"
    path.write_text(TRAIN, encoding="utf-8")
    examples, unseen = read_task3(path)
    assert unseen == 0
    assert [(e.source, e.target, e.line) for e in examples] == [
        ("aalten", "aalen", 1),
        ("Hunde", "Hundes", 2),
        ("ging", "gingen", 4),
    ]
    assert examples[1].tags == {"pos": "N", "case": "GEN", "num": "SG"}
    inv = TagInventory.build(e.tags for e in examples)
    assert inv.features == ("pos", "mood", "tense", "per", "num", "case")
    assert inv.values["pos"] == ("V", "N") and inv.values["tense"] == ("PRS", "PST")
    assert inv.sizes == [3, 2, 3, 2, 3, 2]
    codes = inv.encode(examples[2].tags)
    assert codes == [1, 0, 2, 0, 2, 0]
    assert inv.decode(codes) == examples[2].tags
    assert TagInventory.from_dict(inv.to_dict()) == inv


def test_malformed_line_named(tmp_path):
    path = tmp_path / "bad"
    path.write_text("a\tpos=V\tb\nonly-two\tpos=V\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad, line 2: expected .* 2 column"):
        read_task3(path)


def test_unseen_feature_at_test_time_names_file_and_line(tmp_path):
    _write(tmp_path, "x", TRAIN, "a\tpos=V\tb\n", "a\tpos=V\tb\nc\tpos=N,voice=PASS\td\n")
    with pytest.raises(ValueError, match=r"x-task3-test, line 2: feature\(s\) \['voice'\]"):
        read_reinflection(tmp_path, "x")
    with pytest.raises(ValueError, match="voice"):  # no option lets an unknown feature through
        read_reinflection(tmp_path, "x", unseen_values="absent")


def test_unseen_value(tmp_path):
    _write(tmp_path, "x", TRAIN, "a\tpos=V\tb\n", "a\tpos=V\tb\nc\tpos=ADJ,num=SG\td\n")
    with pytest.raises(ValueError, match=r"x-task3-test, line 2: value\(s\) \['pos=ADJ'\]"):
        read_reinflection(tmp_path, "x")
    data = read_reinflection(tmp_path, "x", unseen_values="absent")
    assert data.unseen_value_lines == {"dev": 0, "test": 1}
    assert data.inventory.encode(data.test[1].tags, unseen_values="absent")[0] == 0  # pos read as absent
    with pytest.raises(ValueError, match="pos=ADJ"):
        data.inventory.encode(data.test[1].tags)
    assert data.forms(("train",)) == ["aalten", "aalen", "Hunde", "Hundes", "ging", "gingen"]


@needs_data
@pytest.mark.parametrize("language", ["german", "turkish", "russian"])
def test_real_files(language):
    data = read_reinflection(Path(REAL) / "sigmorphon2016", language, unseen_values="absent")
    sizes = {"german": (12777, 1600, 16000), "turkish": (12798, 1600, 1600), "russian": (12798, 1600, 24000)}
    assert (len(data.train), len(data.dev), len(data.test)) == sizes[language]  # the README's line counts
    assert "pos" in data.inventory.features
    assert all(len(data.inventory.encode(e.tags)) == len(data.inventory.features) for e in data.train[:100])
    # Russian test holds case=VOC, which no training line has; German and Turkish test hold no unseen value
    assert (data.unseen_value_lines["test"] > 0) == (language == "russian")


@needs_data
def test_every_language_reads():
    root = Path(REAL) / "sigmorphon2016"
    for language in SIGMORPHON_LANGUAGES:
        data = read_reinflection(root, language, unseen_values="absent")
        assert data.train and data.dev and data.test
