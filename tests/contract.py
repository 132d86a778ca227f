"""The LatentModel contract as reusable checks, and the toy model and data the tests share.

A model joins the contract suite (tests/test_latent_model_contract.py) by appending a
:class:`ModelCase` to :data:`MODEL_CASES`::

    MODEL_CASES.append(ModelCase("hmm-lm", make_model=lambda: HMMLanguageModel(...),
                                 make_batch=lambda g: lm_batch(g, vocab=20)))

``make_batch(generator)`` must build a small padded batch from the given ``torch.Generator``
(some rows shorter than others).  Every check in :data:`CHECKS` then runs on the case.

The toy model, :class:`NaiveBayesMixture`, is the tutorial's categorical mixture over a bag of
words with an exact log marginal and an amortised categorical ``q(z | x)``; :class:`ToyCorpus`
is a data object with the ``__len__`` / ``iterate(epoch, start)`` protocol of the trainer.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentnlp.models import BernoulliFactorModel, BinaryVAE, FactorialHMM, MixtureOfCategoricals, NeuralTopicModel
from latentnlp.models.base import ELBO, OBJECTIVES, IntractableError, LatentModel, UnsupportedObjectiveError
from latentnlp.models.sentence_vae import SentenceVAE

# ---- the toy model -------------------------------------------------------------------------------


class NaiveBayesMixture(LatentModel):
    """Categorical "naive Bayes" mixture over the target tokens of each example.

    ``z ~ Cat(pi)``, ``x_t | z ~ Cat(phi_z)`` i.i.d. for ``t < length``, so exactly::

        log p(x) = logsumexp_k [ log pi_k + sum_{t < L} log phi_k[x_t] ]

    ``q(z | x) = softmax(W bow(x) + b)`` from the normalised bag of words.  ``elbo`` enumerates
    ``q`` (``estimator="exact"``) or samples it with a score-function surrogate
    (``estimator="sample"``); ``iwae`` samples ``q``.
    """

    objectives = ("marginal", "elbo", "iwae")

    def __init__(self, vocab_size: int = 12, num_classes: int = 3) -> None:
        super().__init__()
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.prior_logits = nn.Parameter(0.1 * torch.randn(num_classes))
        self.emit_logits = nn.Parameter(0.1 * torch.randn(num_classes, vocab_size))
        self.encoder = nn.Linear(vocab_size, num_classes)

    def _mask(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        targets, lengths = batch["targets"], batch["lengths"]
        positions = torch.arange(targets.shape[1], device=targets.device)
        return targets, positions < lengths.unsqueeze(1)

    def log_likelihoods(self, batch: Mapping[str, Any]) -> Tensor:
        """``log p(x | z = k)`` for every ``k``: ``[B, K]``."""
        targets, mask = self._mask(batch)
        log_phi = F.log_softmax(self.emit_logits, dim=-1)  # [K, V]
        per_token = log_phi.t()[targets.clamp(0, self.vocab_size - 1)]  # [B, T, K]
        return torch.where(mask.unsqueeze(-1), per_token, 0.0).sum(1)

    def log_prior(self) -> Tensor:
        return F.log_softmax(self.prior_logits, dim=-1)

    def log_q(self, batch: Mapping[str, Any]) -> Tensor:
        targets, mask = self._mask(batch)
        counts = torch.zeros(targets.shape[0], self.vocab_size, device=targets.device)
        counts.scatter_add_(1, torch.where(mask, targets, 0), mask.float())
        bow = counts / mask.sum(1, keepdim=True).clamp_min(1)
        return F.log_softmax(self.encoder(bow), dim=-1)

    def log_marginal(self, batch: Mapping[str, Any]) -> Tensor:
        return torch.logsumexp(self.log_prior() + self.log_likelihoods(batch), dim=-1)

    def elbo(self, batch, *, estimator: str | None = None, num_samples: int = 1, kl_weight: float = 1.0) -> ELBO:
        log_lik, log_prior, log_q = self.log_likelihoods(batch), self.log_prior(), self.log_q(batch)
        q = log_q.exp()
        kl = (q * (log_q - log_prior)).sum(-1)
        if estimator in (None, "exact"):
            recon = (q * log_lik).sum(-1)
            surrogate_recon = recon
        elif estimator == "sample":
            z = torch.multinomial(q.detach(), num_samples, replacement=True).t()  # [S, B]
            lp = log_lik.gather(1, z.t()).t()  # [S, B]
            lq = log_q.gather(1, z.t()).t()
            recon = lp.mean(0)
            baseline = lp.detach().mean(0) if num_samples > 1 else 0.0
            surrogate_recon = recon + ((lp.detach() - baseline) * (lq - lq.detach())).mean(0)
        else:
            raise ValueError(f"estimator must be 'exact' or 'sample', got {estimator!r}")
        return ELBO(value=recon - kl, reconstruction=recon, kl=kl, surrogate=surrogate_recon - kl_weight * kl)

    def iwae(self, batch, num_samples: int) -> Tensor:
        log_lik, log_prior, log_q = self.log_likelihoods(batch), self.log_prior(), self.log_q(batch)
        z = torch.multinomial(log_q.detach().exp(), num_samples, replacement=True)  # [B, S]
        log_w = log_lik.gather(1, z) + log_prior[z] - log_q.gather(1, z)
        return torch.logsumexp(log_w, dim=1) - math.log(num_samples)

    def posterior(self, batch) -> torch.distributions.Categorical:
        logits = self.log_prior() + self.log_likelihoods(batch)
        return torch.distributions.Categorical(logits=logits)

    def generate(self, batch, generator: torch.Generator | None = None) -> Tensor:
        """Sample a class and then ``T`` tokens for each row: ``[B, T]``."""
        b, t = batch["targets"].shape
        z = torch.multinomial(self.log_prior().exp(), b, replacement=True, generator=generator)
        probs = F.softmax(self.emit_logits, dim=-1)[z]
        return torch.multinomial(probs, t, replacement=True, generator=generator)


class StreamingUnigram(LatentModel):
    """A unigram LM whose logits move with a state carried from batch to batch (a BPTT toy).

    Row ``b`` of a batch continues row ``b`` of the previous batch of the stream: the carried
    state ``s_b`` (``1`` after :meth:`reset_state`) shifts the logits,
    ``log p(x_t) = log_softmax(logits + s_b * gate)[x_t]``, and is then updated to
    ``s_b / 2 + (fraction of this row's tokens below V / 2)``.  No latent variable: the
    marginal is exact.  The state travels in ``state_dict`` through ``get_extra_state``.
    """

    objectives = ("marginal",)

    def __init__(self, vocab_size: int = 12) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.logits = nn.Parameter(0.1 * torch.randn(vocab_size))
        self.gate = nn.Parameter(0.1 * torch.randn(vocab_size))
        self.state: Tensor | None = None

    def log_marginal(self, batch: Mapping[str, Any]) -> Tensor:
        targets, lengths = batch["targets"], batch["lengths"]
        mask = torch.arange(targets.shape[1], device=targets.device) < lengths.unsqueeze(1)
        carry = self.state
        if carry is None or carry.shape[0] != targets.shape[0]:
            carry = torch.ones(targets.shape[0], device=targets.device)
        log_p = F.log_softmax(self.logits + carry.unsqueeze(1) * self.gate, dim=-1)  # [B, V]
        per_token = log_p.gather(1, targets.clamp(0, self.vocab_size - 1))
        low = ((targets < self.vocab_size // 2) & mask).sum(1) / mask.sum(1)
        self.state = (0.5 * carry + low).detach()
        return torch.where(mask, per_token, 0.0).sum(1)

    def reset_state(self) -> None:
        self.state = None

    def get_extra_state(self) -> dict:
        return {"state": self.state}

    def set_extra_state(self, state: dict) -> None:
        self.state = state["state"]


# ---- toy data ------------------------------------------------------------------------------------


def lm_batch(
    generator: torch.Generator, *, batch_size: int = 5, max_len: int = 7, vocab_size: int = 12
) -> dict[str, Tensor]:
    """A random padded language-model batch (``inputs``, ``targets``, ``lengths``)."""
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=generator)
    lengths[0] = max_len
    targets = torch.randint(0, vocab_size, (batch_size, max_len), generator=generator)
    inputs = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), targets[:, :-1]], 1)
    pad = torch.arange(max_len) >= lengths.unsqueeze(1)
    return {"inputs": inputs.masked_fill(pad, 0), "targets": targets.masked_fill(pad, 0), "lengths": lengths}


def mixture_batches(
    num_batches: int,
    *,
    batch_size: int = 8,
    max_len: int = 6,
    vocab_size: int = 12,
    num_classes: int = 3,
    seed: int = 0,
    mixture_seed: int = 0,
) -> list[dict]:
    """Batches sampled (with ``seed``) from a well-separated naive Bayes mixture drawn with
    ``mixture_seed``: training and validation sets share ``mixture_seed``, not ``seed``.

    Each batch carries its index as a non-tensor value ``"batch_id"``.
    """
    mixture = torch.Generator().manual_seed(mixture_seed)
    emit = torch.softmax(3.0 * torch.randn(num_classes, vocab_size, generator=mixture), -1)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(num_batches):
        z = torch.randint(0, num_classes, (batch_size,), generator=g)
        targets = torch.multinomial(emit[z], max_len, replacement=True, generator=g)
        lengths = torch.randint(2, max_len + 1, (batch_size,), generator=g)
        pad = torch.arange(max_len) >= lengths.unsqueeze(1)
        targets = targets.masked_fill(pad, 0)
        inputs = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), targets[:, :-1]], 1)
        batches.append({"inputs": inputs, "targets": targets, "lengths": lengths, "batch_id": i})
    return batches


class ToyCorpus:
    """In-memory batches with the trainer's data protocol.

    ``iterate(epoch, start)`` yields the batches in an order that is a function of
    ``(seed, epoch)`` only (identity when ``shuffle=False``), skipping the first ``start``.
    """

    def __init__(self, batches: list[dict], *, seed: int = 0, shuffle: bool = True) -> None:
        self.batches, self.seed, self.shuffle = batches, seed, shuffle

    def __len__(self) -> int:
        return len(self.batches)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.batches)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.batches), generator=g).tolist()

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        for i in self.order(epoch)[start:]:
            yield dict(self.batches[i])

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)


def check_data_source(data, epochs: tuple[int, ...] = (0, 1)) -> None:
    """A data object keeps the trainer's protocol: sized, reproducible order, ``start`` skips."""
    assert len(data) > 0
    for epoch in epochs:
        first = list(data.iterate(epoch))
        again = list(data.iterate(epoch))
        assert len(first) == len(data)
        for a, b in zip(first, again):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], Tensor):
                    assert torch.equal(a[k], b[k])
        start = len(first) // 2
        rest = list(data.iterate(epoch, start=start))
        assert len(rest) == len(first) - start
        for a, b in zip(first[start:], rest):
            for k in a:
                if isinstance(a[k], Tensor):
                    assert torch.equal(a[k], b[k])


# ---- the contract --------------------------------------------------------------------------------

DEFAULT_OBJECTIVE_KWARGS: Mapping[str, Mapping[str, Any]] = {"iwae": {"num_samples": 8}}


@dataclass(frozen=True)
class ModelCase:
    """One model in the contract suite.

    ``make_model()`` builds it (called after ``torch.manual_seed(0)``); ``make_batch(generator)``
    builds a padded batch.  ``objective_kwargs[objective]`` are passed to ``loss``, over
    :data:`DEFAULT_OBJECTIVE_KWARGS` (``iwae`` gets ``num_samples=8`` unless told);
    ``padded`` maps each padded ``[B, T, ...]`` tensor of the batch to the name of its lengths
    tensor; ``elbo_kwargs`` go to ``elbo`` and ``iwae_samples`` to ``iwae`` in the bound check.
    """

    name: str
    make_model: Callable[[], LatentModel]
    make_batch: Callable[[torch.Generator], dict]
    objective_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    padded: Mapping[str, str] = field(default_factory=lambda: {"inputs": "lengths", "targets": "lengths"})
    elbo_kwargs: Mapping[str, Any] = field(default_factory=dict)
    iwae_samples: int = 32
    atol: float = 1e-5

    def model(self) -> LatentModel:
        torch.manual_seed(0)
        return self.make_model()

    def batch(self, seed: int = 0) -> dict:
        return self.make_batch(torch.Generator().manual_seed(seed))

    def kwargs(self, objective: str) -> dict[str, Any]:
        return {**DEFAULT_OBJECTIVE_KWARGS.get(objective, {}), **self.objective_kwargs.get(objective, {})}


def _seeded(fn: Callable[[], Any], seed: int = 0, model: LatentModel | None = None) -> Any:
    """``fn()`` under a fixed seed, after resetting the model's carried state."""
    if model is not None:
        model.reset_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _log_marginal(model: LatentModel, batch: dict) -> Tensor | None:
    try:
        return _seeded(lambda: model.log_marginal(batch), model=model)
    except IntractableError:
        return None


def check_declares_objectives(case: ModelCase) -> None:
    model = case.model()
    assert model.objectives, f"{case.name} declares no objectives"
    assert set(model.objectives) <= set(OBJECTIVES), model.objectives


def bound_metric(objective: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """The metric holding the negative objective: ``neg_elbo`` under ``elbo`` and under
    ``wake-sleep`` with one wake sample (bounds, not likelihood estimates), ``nll`` otherwise."""
    one_sample = (kwargs or {}).get("num_samples", 1) < 2
    return "neg_elbo" if objective == "elbo" or (objective == "wake-sleep" and one_sample) else "nll"


def check_loss_per_objective(case: ModelCase) -> None:
    """Each declared objective gives a finite scalar and [B] ``nll`` (``neg_elbo`` under
    ``elbo``, and then no ``nll``) / ``tokens`` metrics."""
    model, batch = case.model(), case.batch()
    size = model.num_tokens(batch).shape[0]
    for objective in model.objectives:
        loss = _seeded(lambda: model.loss(batch, objective, **case.kwargs(objective)), model=model)
        assert loss.value.dim() == 0, (objective, loss.value.shape)
        assert torch.isfinite(loss.value), (objective, loss.value)
        bound = bound_metric(objective, case.kwargs(objective))
        for name in (bound, "tokens"):
            assert name in loss.metrics, (objective, sorted(loss.metrics))
        if bound == "neg_elbo":
            assert "nll" not in loss.metrics, "an ELBO is not a likelihood: name it neg_elbo"
        for name, value in loss.metrics.items():
            assert value.shape == (size,), (objective, name, value.shape)
            assert not value.requires_grad, (objective, name)
        assert torch.all(loss.metrics["tokens"] > 0)
        assert torch.isfinite(loss.metrics[bound]).all()


def check_unsupported_objectives(case: ModelCase) -> None:
    model, batch = case.model(), case.batch()
    for objective in OBJECTIVES:
        if objective not in model.objectives:
            try:
                model.loss(batch, objective)
            except UnsupportedObjectiveError:
                pass
            else:
                raise AssertionError(f"{case.name}: undeclared {objective!r} did not raise")
    try:
        model.loss(batch, "no-such-objective")
    except ValueError:
        pass
    else:
        raise AssertionError("an unknown objective name did not raise ValueError")


def check_marginal_loss(case: ModelCase) -> None:
    """``loss(marginal).value == -sum(log_marginal) / tokens`` and ``nll == -log_marginal``."""
    model, batch = case.model(), case.batch()
    if "marginal" not in model.objectives:
        return
    log_px = _log_marginal(model, batch)
    loss = _seeded(lambda: model.loss(batch, "marginal", **case.kwargs("marginal")), model=model)
    tokens = loss.metrics["tokens"].sum()
    expected = -log_px.sum() / tokens
    assert torch.allclose(loss.value.double(), expected.double(), atol=case.atol), (loss.value, expected)
    assert torch.allclose(loss.metrics["nll"].double(), -log_px.detach().double(), atol=case.atol)


def check_gradients(case: ModelCase) -> None:
    """Gradients are finite for every objective and reach every parameter under some objective."""
    model, batch = case.model(), case.batch()
    reached: set[str] = set()
    for objective in model.objectives:
        model.zero_grad(set_to_none=True)
        loss = _seeded(lambda: model.loss(batch, objective, **case.kwargs(objective)), model=model)
        loss.value.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), (objective, name)
                if p.grad.abs().sum() > 0:
                    reached.add(name)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in reached]
    assert not missing, f"{case.name}: no gradient reaches {missing}"


def check_iwae_bounds_elbo(case: ModelCase) -> None:
    """On average ``iwae(S) >= elbo`` (both lower-bound ``log p(x)``, the IWAE more tightly)."""
    model, batch = case.model(), case.batch()
    try:
        elbos = _seeded(
            lambda: torch.stack([model.elbo(batch, **case.elbo_kwargs).value.detach() for _ in range(8)]), model=model
        )
    except UnsupportedObjectiveError:
        return
    iwaes = _seeded(
        lambda: torch.stack([model.iwae(batch, case.iwae_samples).detach() for _ in range(8)]), seed=1, model=model
    )
    elbo, iwae = elbos.mean(0).sum(), iwaes.mean(0).sum()
    noise = (elbos.std(0).pow(2).sum() + iwaes.std(0).pow(2).sum()).sqrt() / math.sqrt(8)
    assert iwae >= elbo - 3 * noise - 1e-4, (float(iwae), float(elbo), float(noise))
    log_px = _log_marginal(model, batch)
    if log_px is not None:  # both are lower bounds of the exact marginal
        assert elbo <= log_px.sum() + 3 * noise + 1e-4
        assert iwae <= log_px.sum() + 3 * noise + 1e-4


def _corrupt_padding(case: ModelCase, batch: dict, generator: torch.Generator) -> dict:
    out = dict(batch)
    for name, lengths_name in case.padded.items():
        if name not in batch:
            continue
        tensor, lengths = batch[name], batch[lengths_name]
        pad = torch.arange(tensor.shape[1]) >= lengths.unsqueeze(1)
        pad = pad.reshape(pad.shape + (1,) * (tensor.dim() - 2)).expand_as(tensor)
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        else:
            high = int(tensor.max()) + 1
            noise = torch.randint(0, high, tensor.shape, generator=generator, dtype=tensor.dtype)
        out[name] = torch.where(pad, noise, tensor)
    return out


def check_padding_invariance(case: ModelCase) -> None:
    """``log_marginal`` (or the loss metrics) do not change when padding contents do."""
    model, batch = case.model(), case.batch()
    g = torch.Generator().manual_seed(123)
    other = _corrupt_padding(case, batch, g)
    a, b = _log_marginal(model, batch), _log_marginal(model, other)
    if a is None:
        objective = model.objectives[0]
        kwargs = case.kwargs(objective)
        name = bound_metric(objective, kwargs)
        a = _seeded(lambda: model.loss(batch, objective, **kwargs).metrics[name], model=model)
        b = _seeded(lambda: model.loss(other, objective, **kwargs).metrics[name], model=model)
    assert torch.allclose(a, b, atol=case.atol), (a, b)


def check_reset_state(case: ModelCase) -> None:
    """``reset_state()`` exists, and after it the same batch gives the same loss."""
    model, batch = case.model(), case.batch()
    objective = model.objectives[0]
    kwargs = case.kwargs(objective)
    model.reset_state()
    first = _seeded(lambda: model.loss(batch, objective, **kwargs).value.detach())
    _seeded(lambda: model.loss(batch, objective, **kwargs))  # may advance carried state
    model.reset_state()
    again = _seeded(lambda: model.loss(batch, objective, **kwargs).value.detach())
    assert torch.allclose(first, again, atol=case.atol), (first, again)


def check_constructor_record(case: ModelCase) -> None:
    """The model records how it was built, in a form a checkpoint holds, and the record rebuilds it:
    same class, same parameter and buffer shapes, and with the same state the same loss."""
    model, batch = case.model(), case.batch()
    record = model.constructor
    assert record is not None, f"{case.name}: constructor arguments are not plain data"
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == record
    rebuilt = LatentModel.from_constructor(record)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    objective = model.objectives[0]
    kwargs = case.kwargs(objective)
    a = _seeded(lambda: model.loss(batch, objective, **kwargs).value.detach(), model=model)
    b = _seeded(lambda: rebuilt.loss(batch, objective, **kwargs).value.detach(), model=rebuilt)
    assert torch.equal(a, b), (a, b)


CHECKS: list[Callable[[ModelCase], None]] = [
    check_declares_objectives,
    check_loss_per_objective,
    check_unsupported_objectives,
    check_marginal_loss,
    check_gradients,
    check_iwae_bounds_elbo,
    check_padding_invariance,
    check_reset_state,
    check_constructor_record,
]

MODEL_CASES: list[ModelCase] = [
    ModelCase(
        "naive-bayes-mixture",
        make_model=lambda: NaiveBayesMixture(12, 3),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
    ModelCase(
        "naive-bayes-mixture/sampled-elbo",
        make_model=lambda: NaiveBayesMixture(12, 3),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
        objective_kwargs={"elbo": {"estimator": "sample", "num_samples": 4}},
        elbo_kwargs={"estimator": "sample", "num_samples": 1},
    ),
    ModelCase(
        "streaming-unigram", make_model=lambda: StreamingUnigram(12), make_batch=lambda g: lm_batch(g, vocab_size=12)
    ),
    ModelCase(
        "factorial-hmm",
        make_model=lambda: FactorialHMM(2, 3, 6),
        make_batch=lambda g: {
            "observations": (torch.rand(5, 7, 6, generator=g) < 0.3).float(),
            "lengths": torch.tensor([7, 3, 5, 1, 6]),
        },
        padded={"observations": "lengths"},
    ),
]


def reinflection_batch(
    generator: torch.Generator, *, batch_size: int = 6, max_len: int = 6, vocab_size: int = 10, tag_sizes=(3, 2, 4)
) -> dict:
    """A padded :class:`~latentnlp.models.MultiSpaceVAE` batch: forms of characters ``3..V-1``
    (0 pad, 1 ``<bos>``, 2 ``<eos>``); even rows labelled reinflection pairs (another form encoded),
    odd rows unlabelled forms that encode themselves."""
    lengths = torch.randint(1, max_len, (batch_size,), generator=generator)
    lengths[0] = max_len - 1
    forms = torch.randint(3, vocab_size, (batch_size, max_len - 1), generator=generator)
    forms = forms.masked_fill(torch.arange(max_len - 1) >= lengths[:, None], 0)
    targets = torch.cat([forms, torch.zeros(batch_size, 1, dtype=torch.long)], 1)
    targets[torch.arange(batch_size), lengths] = 2
    inputs = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), targets[:, :-1]], 1)
    inputs = inputs.masked_fill(torch.arange(max_len) > lengths[:, None], 0)
    labelled = torch.arange(batch_size) % 2 == 0
    src = torch.randint(3, vocab_size, (batch_size, max_len - 1), generator=generator)
    src_lengths = torch.randint(1, max_len, (batch_size,), generator=generator)
    src = torch.where(labelled[:, None], src.masked_fill(torch.arange(max_len - 1) >= src_lengths[:, None], 0), forms)
    src_lengths = torch.where(labelled, src_lengths, lengths)
    tags = torch.stack([torch.randint(0, k, (batch_size,), generator=generator) for k in tag_sizes], 1)
    return {
        "src": src,
        "src_lengths": src_lengths,
        "inputs": inputs,
        "targets": targets,
        "lengths": lengths + 1,
        "tags": tags,
        "labelled": labelled,
    }


def _msved(estimator: str) -> LatentModel:
    from latentnlp.models import MultiSpaceVAE

    return MultiSpaceVAE(
        10,
        [3, 2, 4],
        embedding_size=8,
        hidden_size=12,
        latent_size=4,
        tag_dim=6,
        estimator=estimator,
        bos_id=1,
        eos_id=2,
    )


MODEL_CASES += [
    ModelCase(
        f"multi-space-vae/{estimator}",
        make_model=lambda estimator=estimator: _msved(estimator),
        make_batch=reinflection_batch,
        padded={"src": "src_lengths", "inputs": "lengths", "targets": "lengths"},
        objective_kwargs={"elbo": {"num_samples": 2}},
    )
    for estimator in ("gumbel_softmax", "score_function")
]


def bag_batch(generator: torch.Generator, *, batch_size: int = 5, vocab_size: int = 12) -> dict[str, Tensor]:
    """Word counts ``[B, V]`` of random documents of 1..8 tokens (a bag-of-words batch), and their
    ``lengths [B]`` (token numbers; the bag models count ``counts`` themselves, the checks read the
    batch size from ``lengths``)."""
    lengths = torch.randint(1, 9, (batch_size,), generator=generator)
    words = torch.randint(0, vocab_size, (batch_size, 8), generator=generator)
    counts = torch.zeros(batch_size, vocab_size)
    counts.scatter_add_(1, words, (torch.arange(8) < lengths.unsqueeze(1)).float())
    return {"counts": counts, "lengths": lengths}


_SCORE_FUNCTION = {"estimator": "score_function", "baseline": "learned", "control_variate": True, "num_samples": 2}
MODEL_CASES += [
    ModelCase(
        f"{name}/{label}",
        make_model=functools.partial(make, 12, 3, hidden_size=8, learned_baseline="baseline" in kwargs),
        make_batch=lambda g: bag_batch(g, vocab_size=12),
        objective_kwargs={"elbo": kwargs},
        padded={},
        elbo_kwargs=kwargs,
    )
    for name, make in (
        ("mixture-of-categoricals", MixtureOfCategoricals),
        ("bernoulli-factor", BernoulliFactorModel),
    )
    for label, kwargs in (("score-function", _SCORE_FUNCTION), ("exact-elbo", {"estimator": "exact"}))
]

MODEL_CASES += [
    ModelCase(
        "sentence-vae/lstm",
        make_model=lambda: SentenceVAE(12, 8, 10, 3, bos_id=0, eos_id=1),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
    ModelCase(
        "sentence-vae/cnn",
        make_model=lambda: SentenceVAE(12, 8, 10, 3, decoder="cnn", dilations=(1, 2), bos_id=0, eos_id=1),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
    ModelCase(
        "binary-vae",
        make_model=lambda: BinaryVAE(16, 3, 8),
        make_batch=lambda g: {"pixels": torch.bernoulli(torch.full((5, 16), 0.3), generator=g)},
        padded={},
    ),
    ModelCase(
        "binary-vae/reweighted-wake-sleep",
        make_model=lambda: BinaryVAE(16, 3, 8),
        make_batch=lambda g: {"pixels": torch.bernoulli(torch.full((5, 16), 0.3), generator=g)},
        objective_kwargs={"wake-sleep": {"num_samples": 4, "reweighted": True, "q_update": "both"}},
        padded={},
    ),
    ModelCase(
        "neural-topic-model",
        make_model=lambda: NeuralTopicModel(12, 3, 8),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
]


def _feature_hmm() -> LatentModel:
    from latentnlp.models import FeatureHMM

    return FeatureHMM(
        ["the", "cat", "cats", "ran", "1990s", "well-known", "U.S.", "dog", "dogs", "a", "an", "<eos>"], 3
    )


MODEL_CASES.append(ModelCase("feature-hmm", make_model=_feature_hmm, make_batch=lambda g: lm_batch(g, vocab_size=12)))
MODEL_CASES.append(
    ModelCase(
        "sentence-vae/vmf",
        make_model=lambda: SentenceVAE(12, 8, 10, 3, latent="vmf", concentration=10.0, bos_id=0, eos_id=1),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    )
)
