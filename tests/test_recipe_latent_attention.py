"""The latent-attention recipe end to end: smoke preset, soft / exact / elbo-enum / exact-top3, in a temp folder."""

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "latent_attention.py"
MODES = ["soft", "exact", "elbo-enum", "exact-top3"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("latent_attention_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(scope="module")
def smoke_run(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent-attention-smoke")
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress"]
    for mode in MODES:
        argv += ["--mode", mode]
    rows = recipe.main(argv)
    return out, rows


def test_smoke_writes_every_file(smoke_run):
    out, rows = smoke_run
    assert [r["mode"] for r in rows] == MODES
    for name in (
        "results.md",
        "metrics.jsonl",
        "config.json",
        "curves.png",
        "alignments-exact.png",
        "alignments-elbo-enum.png",
        "data/train.src",
        "data/test.tgt",
    ):
        assert (out / name).is_file(), name
    for mode in MODES:
        for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "finished.json", "eval.json", "test.hyp"):
            assert (out / mode / name).is_file(), f"{mode}/{name}"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["mode"] for line in lines] == MODES
    assert json.loads((out / "config.json").read_text())["modes"] == MODES


def test_smoke_results_table_and_learning(smoke_run):
    out, rows = smoke_run
    text = (out / "results.md").read_text()
    assert "| mode | PPL | ELBO PPL (bound) | BLEU (tok, lc) | sacreBLEU (detok) |" in text
    assert "## Published" in text and "| soft attention | 7.03 | 32.31 |" in text
    assert "exact-marginal PPL below soft-attention PPL" in text
    for mode in MODES:
        assert re.search(rf"^\| {mode} \| \d+\.\d\d \|", text, re.M), mode
    test = {r["mode"]: r["test"]["test"] for r in rows}
    for mode in MODES:
        # the synthetic pair is learnt: far above a chance BLEU of ~0, perplexity near its floor (~1.2)
        assert test[mode]["bleu_tok"] > 20, (mode, test[mode])
        assert test[mode]["ppl"] < 3.0, (mode, test[mode])
    # the ELBO bounds the exact marginal: its perplexity is never below it
    assert test["elbo-enum"]["elbo_ppl"] >= test["elbo-enum"]["ppl"] * (1 - 1e-6)
    # so does the pruned sum of exact-top3, which it trains; its PPL is the exact marginal
    assert test["exact-top3"]["elbo_ppl"] >= test["exact-top3"]["ppl"] * (1 - 1e-6)
    assert "exact-top3: pruned-marginal perplexity bound >= exact-marginal PPL | pass" in text
    assert "## Pruned latent attention against exact, after the same wall-clock time" in text
    assert re.search(r"^\| exact-top3 \| 3 \| \d+\.\d\d \|", text, re.M)
    assert all(r["updates_per_s"] > 0 for r in rows)


def test_finished_runs_are_reused(recipe, smoke_run, capsys):
    """A finished run is not retrained; its evaluation is reused while the decoding settings stand."""
    out, rows = smoke_run
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress", "--mode", "soft"]
    again = recipe.main(argv)
    assert "reusing it" in capsys.readouterr().out
    assert again[0]["test"] == rows[0]["test"]

    cache = out / "soft" / "eval.json"
    cached = json.loads(cache.read_text())
    cached["test"]["test"]["ppl"] = -1.0  # a marker: a reused entry carries it into the results
    cache.write_text(json.dumps(cached))
    assert recipe.main(argv)[0]["test"]["test"]["ppl"] == -1.0
    capped = recipe.main(argv + ["--decode-limit", "5"])[0]["test"]["test"]
    assert capped["decoded"] == 5 and capped["ppl"] == pytest.approx(rows[0]["test"]["test"]["ppl"])


def test_synthetic_pair_needs_reordering(recipe):
    pairs = recipe.generate_pairs(0, 300, random.Random(0))
    swapped = 0
    for src, tgt in pairs:
        s, t = src.split(), tgt.split()
        assert len(s) == len(t)
        for i in range(len(s) - 1):
            if s[i][0] == "a" and s[i + 1][0] == "n":
                assert t[i][0] in "NM" and t[i + 1][0] == "A"
                swapped += 1
        assert all(w == v for w, v in zip(s, t) if w.startswith("Name"))
    assert swapped > 50
    assert 1.0 < recipe.synthetic_oracle_ppl(pairs) < 1.5


def test_detokenize(recipe):
    assert recipe.detokenize("a man , in a red @-@ hat , isn &apos;t here .") == "a man, in a red-hat, isn't here."
    assert recipe.detokenize('he said " hello " ( twice ) .') == 'he said "hello" (twice).'


def test_full_preset_without_training_split(recipe, tmp_path):
    folder = tmp_path / "iwslt14"
    folder.mkdir()
    for split in ("valid", "test"):
        for lang in ("de", "en"):
            (folder / f"{split}.{lang}").write_text("ein test .\n")
    with pytest.raises(SystemExit, match="train.de / train.en"):
        recipe.main(["--preset", "full", "--data", str(tmp_path), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("name", ["cpu", "full"])
def test_modes_with_fewer_updates_are_evaluated_where_the_others_are(recipe, name):
    """A mode's last update count must be an evaluation step of every longer run (equal-update checks)."""
    preset = recipe.PRESETS[name]
    eval_every = preset.train.get("eval_every")
    for mode, overrides in preset.mode_train.items():
        if "max_steps" in overrides:
            assert eval_every and overrides["max_steps"] % eval_every == 0, (mode, overrides)


def _row(mode, steps, test_ppl, curve):
    return {"mode": mode, "steps": steps, "valid_curve": curve, "test": {"t": {"ppl": test_ppl}}}


def test_soft_exact_check_uses_equal_updates(recipe):
    equal = recipe.checks(
        [_row("soft", 600, 30.0, {300: 40.0, 600: 30.0}), _row("exact", 600, 28.0, {300: 41.0, 600: 29.0})], "t", "cpu"
    )
    assert equal == [
        ("exact-marginal PPL below soft-attention PPL", True, "exact 28.00 vs soft 30.00 (test, equal updates)")
    ]
    # soft trained longer: its test perplexity is not comparable, its validation one at 600 is
    longer = recipe.checks(
        [
            _row("soft", 1200, 20.0, {300: 40.0, 600: 30.0, 900: 25.0, 1200: 20.0}),
            _row("exact", 600, 28.0, {300: 41.0, 600: 32.0}),
        ],
        "t",
        "cpu",
    )
    ((name, passed, detail),) = longer
    assert "equal updates" in name and not passed
    assert detail == "exact 32.00 vs soft 30.00 (validation, both after 600 updates)"


def test_pruned_modes_are_compared_at_equal_time_and_equal_updates(recipe):
    """Budget = the shortest training time (the top-3 run's 100 s): each run's last validation by
    then, its validation at exact's 600 updates (none: '-'), and its final one."""

    def row(mode, steps, wall_time, timeline):
        return {
            "mode": mode,
            "steps": steps,
            "wall_time": wall_time,
            "updates_per_s": steps / wall_time,
            "valid_timeline": timeline,
        }

    rows = [
        row("soft", 900, 50.0, [(50.0, 900, 9.0)]),  # not part of the comparison
        row("exact", 600, 150.0, [(70.0, 300, 40.0), (150.0, 600, 30.0)]),
        row("exact-top3", 1200, 100.0, [(30.0, 300, 45.0), (60.0, 600, 35.0), (100.0, 1200, 25.0)]),
        row("exact-top5", 800, 120.0, [(60.0, 400, 42.0), (120.0, 800, 33.0)]),
    ]
    lines = recipe.same_wall_clock(rows)
    assert lines[0] == "## Pruned latent attention against exact, after the same wall-clock time (100 s)"
    table = [line for line in lines if line.startswith("| exact")]
    assert table == [
        "| exact | all | 4.00 | 300 | 40.00 | 30.00 | 600 | 30.00 |",
        "| exact-top3 | 3 | 12.00 | 1,200 | 25.00 | 35.00 | 1,200 | 25.00 |",
        "| exact-top5 | 5 | 6.67 | 400 | 42.00 | - | 800 | 33.00 |",
    ]
    assert recipe.same_wall_clock(rows[:2]) == []  # nothing pruned to compare
