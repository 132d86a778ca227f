"""The reinflection recipe end to end: smoke preset (generated morphology), the three rows, in a temp folder."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "reinflection.py"
ROWS = ["msved-sup", "msved-semi", "encdec"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("reinflection_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(scope="module")
def smoke_run(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reinflection-smoke")
    rows = recipe.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    return out, rows


@pytest.mark.slow
def test_smoke_writes_every_file_and_learns(recipe, smoke_run):
    out, rows = smoke_run
    assert [r["row"] for r in rows] == ROWS
    for name in ("results.md", "metrics.jsonl", "config.json", "curves-generated.png", "data/generated-task3-test"):
        assert (out / name).is_file(), name
    for row in ROWS:
        for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "finished.json", "eval.json", "test.hyp"):
            assert (out / "generated" / row / name).is_file(), f"{row}/{name}"
    assert [json.loads(line)["row"] for line in (out / "metrics.jsonl").read_text().splitlines()] == ROWS
    text = (out / "results.md").read_text()
    assert "| language | model | accuracy | Levenshtein |" in text
    for row in ROWS:
        assert re.search(rf"^\| generated \| {re.escape(recipe.ROW_NAMES[row])} \| \d\.\d{{3}} \|", text, re.M), row
    assert "semi-supervised MSVED accuracy >= supervised |" in text
    # chance exact match on the generated language is about 0 (whole unseen forms): every row learns it
    for r in rows:
        assert r["test"]["accuracy"] > 0.4, r
        assert r["test"]["levenshtein"] < 1.5, r
    # unlabelled rows were added for the semi-supervised MSVED only
    sizes = {r["row"]: r["train_rows"] for r in rows}
    assert sizes["msved-semi"] > sizes["msved-sup"] == 2 * sizes["encdec"]


@pytest.mark.slow
def test_finished_runs_are_reused(recipe, smoke_run):
    out, rows = smoke_run
    again = recipe.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    assert [r["test"] for r in again] == [r["test"] for r in rows]
    assert [r["steps"] for r in again] == [r["steps"] for r in rows]


def test_levenshtein(recipe):
    assert recipe.levenshtein("kitten", "sitting") == 3
    assert recipe.levenshtein("", "abc") == 3 and recipe.levenshtein("abc", "abc") == 0


def test_generated_morphology(recipe):
    data = recipe.generate_language(3, 10, {"train": 4, "test": 2})
    assert len(data["train"]) == 40 and len(data["test"]) == 20
    train_pairs = {(s, tuple(t.items())) for s, t, _ in data["train"]}
    assert not train_pairs & {(s, tuple(t.items())) for s, t, _ in data["test"]}  # test pairs are new
    for source, tags, target in data["train"]:
        stem = target[: len(target) - len(recipe._inflect("", tags))]
        assert target == recipe._inflect(stem, tags) and source.startswith(stem)  # one lemma, suffixes only


def test_published_lines_list_the_shared_task_for_the_languages_run(recipe):
    from latentnlp.data import SIGMORPHON_LANGUAGES

    for track in recipe.SHARED_TASK_TASK3.values():
        assert set(track) == set(SIGMORPHON_LANGUAGES)
        for first, other in track.values():
            assert first[0] == "LMU-1" and 0 < other[1] <= first[1] <= 100
    text = "\n".join(recipe.published_lines(["german", "german", "turkish"]))
    assert re.search(r"^\| german \| 0\.924 \(LMU-1\) \| 0\.896 \(BIU/MIT-1\) \| 0\.956 \(LMU-1\) \|", text, re.M)
    assert len(re.findall(r"^\| (german|turkish) \|", text, re.M)) == 2
    assert "No published number" in "\n".join(recipe.published_lines(["generated"]))


def test_semi_supervised_batches_add_unlabelled_rows_to_each_labelled_batch(recipe):
    from latentnlp.data import TagInventory, Vocabulary

    specials = recipe.SPECIALS
    chars = Vocabulary([*specials.values(), *"abcdefgh"], **specials)
    inventory = TagInventory.build([{"pos": "N"}, {"pos": "V"}])
    labelled = [recipe.Row(w, {"pos": "N"}, w) for w in ("ab", "bc", "cd", "de", "ef")]
    unlabelled = [recipe.Row(w, None, w) for w in ("fg", "gh", "ha")]
    batches = recipe.ReinflectionBatches(
        labelled, chars, inventory, "msved", 2, shuffle=True, seed=3, unlabelled=unlabelled
    )
    assert len(batches) == 3  # a pass over the labelled rows
    seen = []
    for epoch in (0, 1):
        full = list(batches.iterate(epoch))
        for b, batch in enumerate(full):
            flags = batch["labelled"].tolist()
            assert flags == [True] * len(flags[: len(flags) - 2]) + [False, False]  # 2 unlabelled each
            resumed = next(batches.iterate(epoch, start=b))  # resuming at b gives batch b again
            assert all(torch.equal(resumed[key], batch[key]) for key in batch)
            seen.append(batch["src"][-2:])
    # every unlabelled form comes round: 12 unlabelled rows over 6 updates, 3 forms
    assert len({tuple(row.tolist()) for src in seen for row in src}) == 3
