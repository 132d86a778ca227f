"""Every model in contract.MODEL_CASES keeps the LatentModel contract (see tests/contract.py)."""

import pytest
from contract import CHECKS, MODEL_CASES


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_contract(case, check):
    check(case)


# ---- the checks catch broken models --------------------------------------------------------------

import torch  # noqa: E402
from contract import (  # noqa: E402
    ModelCase,
    NaiveBayesMixture,
    StreamingUnigram,
    check_constructor_record,
    check_gradients,
    check_marginal_loss,
    check_padding_invariance,
    check_reset_state,
    check_unsupported_objectives,
    lm_batch,
)


class _LeaksPadding(NaiveBayesMixture):
    def log_marginal(self, batch):
        return super().log_marginal(batch) + 1e-3 * batch["targets"].sum(1)


class _WrongLoss(NaiveBayesMixture):
    def loss(self, batch, objective="marginal", **kwargs):
        out = super().loss(batch, objective, **kwargs)
        out.value = out.value * 1.01
        return out


class _DeadParameter(NaiveBayesMixture):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(3))


class _NoReset(StreamingUnigram):
    def reset_state(self):
        pass


class _AcceptsAnything(NaiveBayesMixture):
    objectives = ("marginal",)

    def loss(self, batch, objective="marginal", **kwargs):
        return super().loss(batch, "marginal")


class _HoldsATensor(NaiveBayesMixture):
    def __init__(self, table=None):
        super().__init__()
        self.table = table


def _case(make_model):
    return ModelCase("broken", make_model=make_model, make_batch=lambda g: lm_batch(g))


@pytest.mark.parametrize(
    "make_model, check",
    [
        (_LeaksPadding, check_padding_invariance),
        (_WrongLoss, check_marginal_loss),
        (_DeadParameter, check_gradients),
        (_NoReset, check_reset_state),
        (_AcceptsAnything, check_unsupported_objectives),
        (lambda: _HoldsATensor(torch.zeros(2)), check_constructor_record),
    ],
    ids=["padding", "marginal-loss", "gradients", "reset-state", "unsupported", "constructor"],
)
def test_checks_reject_broken_models(make_model, check):
    with pytest.raises(AssertionError):
        check(_case(make_model))
