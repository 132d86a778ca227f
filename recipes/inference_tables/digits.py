"""Digits: one Gaussian VAE on binarised 8x8 digits trained by the ELBO, IWAE, wake-sleep and reweighted wake-sleep.

Data (``cpu``/``full``): scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, 1,797
images, no download), binarised at ``pixel >= 8`` of the 0..16 grey levels, split by a seeded
permutation into test (297), validation (200) and train (1,300).  ``smoke``: 8x8 binary images
generated from ten random prototypes with 5% of the pixels flipped.

Every objective trains the same :class:`~latentnlp.models.BinaryVAE` through the library's trainer
(Adam, the same number of updates, the same batches), selects its checkpoint on the validation
IWAE, and is scored on test by the IWAE bound with 1,000 samples (``nll``, nats per image) and by
the ELBO.  There is no published table for this data set; the literature's ordering (Burda et al.
2016; Bornschein & Bengio 2015) is what the checks test: IWAE >= ELBO training, reweighted
wake-sleep >= wake-sleep.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator
from dataclasses import replace

import torch

from inference_tables import TableResult
from latentnlp import plots
from latentnlp.data.batching import epoch_generator
from latentnlp.models import BinaryVAE
from latentnlp.training import TrainConfig, Trainer, evaluate, load_model

TITLE = "Digits: ELBO vs IWAE vs wake-sleep vs reweighted wake-sleep (binarised 8x8 digits)"

THRESHOLD = 8  # a pixel is on when its grey level (0..16) is at least this

#: name -> (objective, objective_kwargs)
OBJECTIVES = {
    "elbo": ("elbo", {}),
    "iwae-5": ("iwae", {"num_samples": 5}),
    "wake-sleep": ("wake-sleep", {}),
    "reweighted-wake-sleep-5": ("wake-sleep", {"num_samples": 5, "reweighted": True, "q_update": "wake"}),
}

PRESETS = {
    "smoke": {"latent_size": 4, "hidden_size": 32, "max_epochs": 6, "batch_size": 50, "test_samples": 100},
    "cpu": {"latent_size": 8, "hidden_size": 128, "max_epochs": 400, "batch_size": 100, "test_samples": 1000},
    "full": {"latent_size": 16, "hidden_size": 200, "max_epochs": 2000, "batch_size": 100, "test_samples": 1000},
}


class ImageBatches:
    """``{"pixels": [B, D]}`` batches in a seeded order per epoch (the trainer's data protocol)."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int) -> None:
        self.pixels, self.batch_size, self.shuffle, self.seed = pixels, batch_size, shuffle, seed

    def __len__(self) -> int:
        return math.ceil(self.pixels.shape[0] / self.batch_size)

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        n = self.pixels.shape[0]
        order = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        for i in range(start, len(self)):
            yield {"pixels": self.pixels[order[i * self.batch_size : (i + 1) * self.batch_size]]}

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)


def load_binarised_digits() -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits as binary vectors ``[1797, 64]`` (``pixel >= THRESHOLD``)."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().data)
    return (images >= THRESHOLD).float()


def generated_digits(seed: int, n: int = 600) -> torch.Tensor:
    """Binary 8x8 images: ten random prototypes (30% on), each pixel flipped with probability 0.05."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(10, 64, generator=g) < 0.3).float()
    images = prototypes[torch.randint(0, 10, (n,), generator=g)]
    flips = (torch.rand(n, 64, generator=g) < 0.05).float()
    return (images + flips) % 2


def split(pixels: torch.Tensor, seed: int, test: int, valid: int) -> dict[str, torch.Tensor]:
    order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))
    return {
        "test": pixels[order[:test]],
        "valid": pixels[order[test : test + valid]],
        "train": pixels[order[test + valid :]],
    }


def independent_pixels_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    """Nats per test image of independent Bernoulli pixels fitted to train (add-one smoothed): the floor."""
    p = (train.sum(0) + 1) / (train.shape[0] + 2)
    log_lik = test * p.log() + (1 - test) * (1 - p).log()
    return float(-log_lik.sum(1).mean())


def run(preset: str, out: pathlib.Path, data_dir: pathlib.Path | None, seed: int) -> TableResult:
    settings = PRESETS[preset]
    if preset == "smoke":
        splits = split(generated_digits(seed), seed, test=100, valid=100)
        data_note = "generated 8x8 binary images (ten prototypes, 5% pixel flips)"
    else:
        splits = split(load_binarised_digits(), seed, test=297, valid=200)
        data_note = f"scikit-learn's bundled 8x8 digits (load_digits), binarised at grey level >= {THRESHOLD} of 16"
    batch_size = settings["batch_size"]
    data = {name: ImageBatches(x, batch_size, shuffle=name == "train", seed=seed) for name, x in splits.items()}
    model_args = {"num_pixels": 64, "latent_size": settings["latent_size"], "hidden_size": settings["hidden_size"]}
    base = TrainConfig(
        lr=1e-3,
        max_epochs=settings["max_epochs"],
        eval_objective="iwae",
        eval_kwargs={"num_samples": 50},
        log_every=10 if preset == "smoke" else 50,
        seed=seed,
        progress=False,
    )
    rows, runs = [], {}
    for name, (objective, kwargs) in OBJECTIVES.items():
        run_dir = out / "digits" / name
        config = replace(base, objective=objective, objective_kwargs=dict(kwargs), output_dir=str(run_dir))
        if (run_dir / "finished.json").exists():
            summary = json.loads((run_dir / "finished.json").read_text())
            model = load_model(run_dir)
        else:
            torch.manual_seed(seed)
            model = BinaryVAE(**model_args)
            summary = Trainer(
                model, config, data["train"], data["valid"], run_info={"table": "digits", "run": name}
            ).fit()
        runs[name] = run_dir
        test_iwae = evaluate(model, data["test"], objective="iwae", num_samples=settings["test_samples"], seed=seed)
        test_elbo = evaluate(model, data["test"], objective="elbo", num_samples=10, seed=seed)
        rows.append(
            {
                "table": "digits",
                "objective": name,
                "test_nll_iwae": test_iwae["nll_per_example"],
                "test_neg_elbo": test_elbo["neg_elbo_per_example"],
                "valid_nll_iwae50": summary["valid"]["nll_per_example"],
                "steps": summary["steps"],
                "ms_per_update": 1000 * summary["wall_time"] / max(summary["steps"], 1),
                "test_samples": settings["test_samples"],
            }
        )
    floor = independent_pixels_nll(splits["train"], splits["test"])
    figure = "digits_curves.png"
    plots.training_curves(
        runs,
        out / figure,
        loss_label="training loss per pixel",
        ppl_title="validation exp(IWAE-50 NLL per pixel)",
    )
    by = {r["objective"]: r for r in rows}
    checks = [
        (
            "IWAE training gives a better test log-likelihood than ELBO training",
            by["iwae-5"]["test_nll_iwae"] < by["elbo"]["test_nll_iwae"],
            f"{by['iwae-5']['test_nll_iwae']:.2f} vs {by['elbo']['test_nll_iwae']:.2f} nats",
        ),
        (
            "reweighted wake-sleep beats wake-sleep",
            by["reweighted-wake-sleep-5"]["test_nll_iwae"] < by["wake-sleep"]["test_nll_iwae"],
            f"{by['reweighted-wake-sleep-5']['test_nll_iwae']:.2f} vs {by['wake-sleep']['test_nll_iwae']:.2f} nats",
        ),
        (
            "every objective beats independent pixels",
            all(r["test_nll_iwae"] < floor for r in rows),
            f"independent pixels {floor:.2f} nats; worst model {max(r['test_nll_iwae'] for r in rows):.2f}",
        ),
        (
            f"IWAE-{settings['test_samples']} is at least the ELBO for every model",
            all(r["test_nll_iwae"] <= r["test_neg_elbo"] + 1e-6 for r in rows),
            ", ".join(f"{r['objective']} {r['test_neg_elbo'] - r['test_nll_iwae']:.2f}" for r in rows),
        ),
    ]
    lines = [
        f"Data: {data_note}; {len(splits['train'])} train / {len(splits['valid'])} valid / "
        f"{len(splits['test'])} test images. Model: BinaryVAE, latent {settings['latent_size']}, hidden "
        f"{settings['hidden_size']}; Adam 1e-3, {settings['max_epochs']} epochs of batches of {batch_size}; "
        "checkpoint selected on the validation IWAE-50.",
        "",
        f"| objective | test NLL (IWAE-{settings['test_samples']}, nats/image) | test -ELBO (nats/image) "
        "| updates | ms/update |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['objective']} | {r['test_nll_iwae']:.2f} | {r['test_neg_elbo']:.2f} | {r['steps']} "
            f"| {r['ms_per_update']:.1f} |"
        )
    lines += [
        f"| independent pixels (reference) | {floor:.2f} | | | |",
        "",
        "No published numbers exist for this data set. `wake-sleep`: q learns on the model's dreams; "
        "`reweighted-wake-sleep-5`: the model and q learn from 5 self-normalised importance samples of "
        "q (the wake-phase q update). The ms/update column includes validation time. In the figure the "
        "training-loss panel shows each objective's own surrogate (not comparable across objectives); "
        "the validation panel compares them on one bound.",
    ]
    return TableResult(
        markdown="\n".join(lines),
        checks=checks,
        figures=[figure],
        metrics=rows,
        config={"preset": preset, "seed": seed, "model": model_args, "objectives": OBJECTIVES, **settings},
    )
