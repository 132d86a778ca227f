"""Bad inputs to the layers and the language models: a ValueError that names the argument, never a
silent wrong number; NaN always reaches the loss; ``ignore_index`` scores nothing and counts no token."""

import math

import pytest
import torch
from torch.distributions import Distribution

from latentnlp.layers import CopyGenerator, LatentAttention, MixtureOfSoftmaxes, SoftmaxOutput
from latentnlp.models.hmm_lm import HMMLanguageModel
from latentnlp.models.lstm_lm import LSTMLanguageModel, MixtureOfSoftmaxesLM
from latentnlp.models.seq2seq import CopyHead, LatentAttentionHead, SoftAttentionHead

pytestmark = pytest.mark.usefixtures("float64")

B, T, S, H, V = 3, 4, 5, 6, 7
LENGTHS = torch.tensor([5, 3, 1])
MASK = torch.arange(S) < LENGTHS[:, None]


@pytest.fixture(params=[True, False], ids=["validating", "not-validating"])
def validating(request):
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(request.param)
    yield request.param
    Distribution.set_default_validate_args(previous)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    memory = torch.randn(B, S, H, generator=g)
    log_alpha = torch.log_softmax(torch.randn(B, T, S, generator=g).masked_fill(~MASK[:, None], -math.inf), -1)
    targets = torch.randint(0, V, (B, T), generator=g)
    src_ext = torch.tensor([[1, 7, 1, 8, 2], [3, 7, 3, 0, 0], [8, 5, 5, 5, 5]])
    return hidden, memory, log_alpha, targets, src_ext


def _attention(mode="exact"):
    torch.manual_seed(0)
    return LatentAttention(H, H, V, mode=mode)


def _copy():
    torch.manual_seed(0)
    return CopyGenerator(H, V)


# ---- the attention source: masks, alignments, empty sources ------------------------------------
@pytest.mark.parametrize("mode", ["exact", "soft"])
def test_attention_source_errors(mode):
    layer = _attention(mode)
    hidden, memory, log_alpha, targets, _ = _inputs()
    no_real = MASK.clone()
    no_real[1] = False
    with pytest.raises(ValueError, match=r"memory_mask has no real \(True\) position in rows \[1\]"):
        layer(hidden, memory, no_real, targets)
    with pytest.raises(ValueError, match=r"memory_mask must be bool \[B, S\]"):
        layer(hidden, memory, MASK.long(), targets)
    with pytest.raises(ValueError, match=r"S = 0"):
        layer(hidden, memory[:, :0], MASK[:, :0], targets)
    empty_row = log_alpha.clone()
    empty_row[0, 2] = -math.inf
    with pytest.raises(ValueError, match="log_alpha is -inf at every source position"):
        layer(hidden, memory, MASK, targets, log_alpha=empty_row)
    with pytest.raises(ValueError, match=r"log_alpha must be \[B, T, S\] = \(3, 4, 5\), got \(3, 4, 4\)"):
        layer(hidden, memory, MASK, targets, log_alpha=log_alpha[..., :4])
    with pytest.raises(ValueError, match="log_alpha must be normalised"):
        layer(hidden, memory, MASK, targets, log_alpha=log_alpha + 0.5)
    with pytest.raises(ValueError, match="not both"):
        layer(hidden, memory, MASK, targets, key_padding_mask=~MASK)
    with pytest.raises(ValueError, match=r"targets must lie in 0..6 \(or be ignore_index = -100\), got ids \d\.\.7"):
        layer(hidden, memory, MASK, targets.masked_fill(targets == targets[0, 0], V))
    with pytest.raises(ValueError, match="targets must be a LongTensor"):
        layer(hidden, memory, MASK, targets.double())


@pytest.mark.parametrize("mode", ["exact", "soft"])
def test_key_padding_mask_is_the_complement(mode):
    layer = _attention(mode)
    hidden, memory, _, targets, _ = _inputs()
    a = layer(hidden, memory, MASK, targets, full=True)
    b = layer(hidden, memory, targets=targets, key_padding_mask=~MASK, full=True)
    torch.testing.assert_close(a.log_prob, b.log_prob)
    torch.testing.assert_close(a.log_probs, b.log_probs)
    torch.testing.assert_close(
        layer.log_prob(hidden, targets, memory=memory, key_padding_mask=~MASK),
        layer.log_prob(hidden, targets, memory=memory, memory_mask=MASK),
    )
    torch.testing.assert_close(
        layer.alignment(hidden, memory, key_padding_mask=~MASK).logits, layer.alignment(hidden, memory, MASK).logits
    )


@pytest.mark.parametrize("mode", ["exact", "soft"])
@pytest.mark.parametrize("where", ["hidden", "memory", "log_alpha"])
def test_attention_nan_is_an_error_or_a_nan_loss(mode, where, validating):
    layer = _attention(mode)
    hidden, memory, log_alpha, targets, _ = _inputs()
    given = {"hidden": hidden, "memory": memory, "log_alpha": log_alpha}
    given[where] = given[where].clone()
    given[where][0, 0, 0] = math.nan  # a real position
    if validating:
        with pytest.raises(ValueError, match=where if where != "log_alpha" else "log_alpha .* NaN"):
            layer(given["hidden"], given["memory"], MASK, targets, log_alpha=given["log_alpha"])
        return
    out = layer(given["hidden"], given["memory"], MASK, targets, log_alpha=given["log_alpha"], full=True)
    assert torch.isnan(-out.log_prob.sum())
    assert torch.isnan(out.log_probs.sum())


def test_attention_inf_in_memory_is_an_error():
    layer = _attention()
    hidden, memory, _, targets, _ = _inputs()
    memory = memory.clone()
    memory[1, 4, 2] = math.inf  # even at padding
    with pytest.raises(ValueError, match=r"memory \(3, 5, 6\) \(0 NaN, 1 inf\)"):
        layer(hidden, memory, MASK, targets)


# ---- the copy layer ------------------------------------------------------------------------------
@pytest.mark.parametrize("full", [False, True])
def test_copy_errors_on_every_path(full):
    layer = _copy()
    hidden, _, log_alpha, targets, src_ext = _inputs()

    def call(h=hidden, a=log_alpha, src=src_ext, y=targets, **kw):
        return layer(h, a, src, y, full=full, **kw)

    with pytest.raises(ValueError, match=r"hidden must be \[B, T, 6\], got \(3, 4, 5\)"):
        call(h=hidden[..., :5])
    with pytest.raises(ValueError, match=r"switch_input must be \[B, T, 6\]"):
        call(switch_input=hidden[..., :5])
    with pytest.raises(ValueError, match=r"switch_input must be \[B, T, 6\]"):
        call(switch_input=hidden[:, :2])
    with pytest.raises(ValueError, match="src_ext must be a LongTensor"):
        call(src=src_ext.double())
    negative = src_ext.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        call(src=negative)
    with pytest.raises(ValueError, match=r"extended_size 8 must exceed the largest id used .* \(8\)"):
        call(extended_size=8)
    with pytest.raises(ValueError, match="extended_size must be >= vocab_size = 7, got 5"):
        call(extended_size=5)
    with pytest.raises(ValueError, match=r"extended_size 9 must exceed the largest id used .* \(11\)"):
        call(y=targets.masked_fill(targets == targets[0, 0], 11), extended_size=9)
    empty_row = log_alpha.clone()
    empty_row[2, 1] = -math.inf
    with pytest.raises(ValueError, match="log_alpha is -inf at every source position"):
        call(a=empty_row)
    with pytest.raises(ValueError, match="log_alpha must be normalised"):
        call(a=log_alpha - 1.0)
    with pytest.raises(ValueError, match="S = 0"):
        call(a=log_alpha[..., :0], src=src_ext[:, :0])
    nan = hidden.clone()
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"hidden \(3, 4, 6\) \(1 NaN, 0 inf\)"):
        call(h=nan)
    with pytest.raises(ValueError, match=r"switch_input \(3, 4, 6\) \(1 NaN"):
        call(switch_input=nan)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("where", ["hidden", "log_alpha", "switch_input"])
def test_copy_nan_is_an_error_or_a_nan_loss(full, where, validating):
    layer = _copy()
    hidden, _, log_alpha, targets, src_ext = _inputs()
    given = {"hidden": hidden, "log_alpha": log_alpha.clone(), "switch_input": hidden.clone()}
    # a position whose word is not the target: a NaN there must not be dropped with it
    given[where][0, 0, 4 if where == "log_alpha" else 0] = math.nan
    targets = targets.clone()
    targets[0, 0] = 3

    def call():
        return layer(
            given["hidden"], given["log_alpha"], src_ext, targets, full=full, switch_input=given["switch_input"]
        )

    if validating:
        with pytest.raises(ValueError, match=where):
            call()
        return
    out = call()
    assert torch.isnan(out.log_prob[0, 0])
    if full:
        assert torch.isnan(out.log_probs[0, 0]).all()


# ---- target ids in every head -------------------------------------------------------------------
def _heads():
    attention = _attention()
    hidden, memory, log_alpha, _, src_ext = _inputs()
    context = {"memory": memory, "memory_mask": MASK, "log_alpha": log_alpha, "src_ext": src_ext}
    return {
        "softmax": (SoftmaxOutput(H, V, 4), {}, V),
        "mos": (MixtureOfSoftmaxes(H, V, 3, 4), {}, V),
        "attention-soft": (_attention("soft"), context, V),
        "attention-exact": (attention, context, V),
        "copy": (_copy(), {**context, "extended_size": V + 2}, V + 2),
        "soft-head": (SoftAttentionHead(attention), context, V),
        "latent-head": (LatentAttentionHead(attention), context, V),
        "copy-head": (
            CopyHead(CopyGenerator(H, V), shared_vocabulary=True),
            {**context, "attentional": torch.tanh(hidden), "extended_size": V + 2},
            V + 2,
        ),
    }


HEADS = list(_heads())


@pytest.mark.parametrize("name", HEADS)
def test_every_head_refuses_targets_out_of_range(name):
    head, context, size = _heads()[name]
    hidden, *_ = _inputs()
    targets = torch.randint(0, V, (B, T))
    for bad in (size, -1):
        wrong = targets.clone()
        wrong[1, 2] = bad
        with pytest.raises(ValueError, match="(targets must lie in|extended ids|extended_size)"):
            head.log_prob(hidden, wrong, **context)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_ignores_ignore_index(name):
    head, context, _ = _heads()[name]
    hidden, *_ = _inputs()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    ignored = torch.zeros(B, T, dtype=torch.bool)
    ignored[0, 1] = ignored[2, 3] = True
    full = head.log_prob(hidden, targets, **context)
    h = hidden.clone().requires_grad_()
    part = head.log_prob(h, targets.masked_fill(ignored, -100), **context)
    assert (part[ignored] == 0).all()
    torch.testing.assert_close(part[~ignored], full[~ignored])
    part.sum().backward()
    if name != "copy-head":  # the copy head reads o_t from its context, not hidden
        assert (h.grad[ignored] == 0).all() and (h.grad[~ignored] != 0).any()
    other = head.log_prob(hidden, targets.masked_fill(ignored, 5), ignore_index=5, **context)
    assert (other[targets == 5] == 0).all() and (other[ignored] == 0).all()


def test_ignored_positions_carry_no_gradient_through_the_parameters():
    layer = _attention()
    hidden, memory, _, targets, _ = _inputs()
    ignored = torch.zeros(B, T, dtype=torch.bool)
    ignored[:, 2:] = True
    layer(hidden, memory, MASK, targets.masked_fill(ignored, -100)).log_prob.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(hidden[:, :2], memory, MASK, targets[:, :2]).log_prob.sum().backward()
    for a, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_exact_emission_terms_are_zero_at_ignored_positions():
    layer = _attention()
    hidden, memory, _, targets, _ = _inputs()
    out = layer(hidden, memory, MASK, targets.masked_fill(torch.eye(B, T, dtype=torch.bool), -100))
    assert (out.log_emission[0, 0] == 0).all() and (out.log_prob[0, 0] == 0)


@pytest.mark.parametrize("name", ["softmax", "mos"])
def test_vocabulary_heads_nan_is_an_error_or_a_nan_loss(name, validating):
    head, _, _ = _heads()[name]
    hidden, *_ = _inputs()
    hidden = hidden.clone()
    hidden[1, 1, 1] = math.nan
    targets = torch.zeros(B, T, dtype=torch.long)
    if validating:
        with pytest.raises(ValueError, match="hidden"):
            head.log_prob(hidden, targets)
        with pytest.raises(ValueError, match="hidden"):
            head.log_probs(hidden)
        return
    assert torch.isnan(head.log_prob(hidden, targets).sum())
    assert torch.isnan(head.log_probs(hidden).sum())


# ---- language models ----------------------------------------------------------------------------
def _lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, V, (3, 5), generator=g)
    targets = torch.randint(0, V, (3, 5), generator=g)
    return {"inputs": inputs, "targets": targets, "lengths": torch.tensor([5, 3, 2])}


def _lms():
    torch.manual_seed(0)
    return {
        "lstm": LSTMLanguageModel(V, 4, 6),
        "mos": MixtureOfSoftmaxesLM(V, 4, 6, num_experts=2),
        "hmm": HMMLanguageModel(V, 3, 8),
        "hmm-low-rank": HMMLanguageModel(V, 3, 8, transition_rank=2),
    }


@pytest.mark.parametrize("name", list(_lms()))
def test_language_models_refuse_targets_out_of_range(name):
    model = _lms()[name].eval()
    batch = _lm_batch()
    for bad in (V, -1, -7):
        targets = batch["targets"].clone()
        targets[0, 1] = bad
        with pytest.raises(ValueError, match="targets"):
            model.log_marginal({**batch, "targets": targets})
    padded = batch["targets"].clone()
    padded[2, 4] = V + 3  # past the row's length: padding is never read
    model.log_marginal({**batch, "targets": padded})


@pytest.mark.parametrize("name", list(_lms()))
def test_language_models_ignore_index_counts_no_token(name):
    model = _lms()[name].eval()
    batch = _lm_batch()
    # ignoring the last real target of each row: its term is 0 (LSTM) or summed out (HMM), which for
    # the last position is the likelihood of the shorter row either way
    last = torch.zeros(3, 5, dtype=torch.bool)
    last[torch.arange(3), batch["lengths"] - 1] = True
    ignored = {**batch, "targets": batch["targets"].masked_fill(last, -100)}
    shorter = {**batch, "lengths": batch["lengths"] - 1}
    shorter["lengths"][2] = 1  # keep rows non-empty; compare the first two rows only
    torch.testing.assert_close(model.log_marginal(ignored)[:2], model.log_marginal(shorter)[:2])
    assert model.num_tokens(ignored).tolist() == [4, 2, 1]
    loss = model.loss(ignored)
    torch.testing.assert_close(loss.metrics["tokens"], torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(loss.value, -model.log_marginal(ignored).sum() / 7)


def test_hmm_ignore_index_sums_the_emission_out():
    model = _lms()["hmm"].eval()
    batch = _lm_batch()
    targets = batch["targets"].clone()
    targets[0, 2] = -100
    log_p = model.log_marginal({**batch, "targets": targets})[0]
    # sum over the word at t = 2: the marginal of the row with that word unobserved
    rows = targets[:1].repeat(V, 1)
    rows[:, 2] = torch.arange(V)
    every = model.log_marginal({"targets": rows, "lengths": torch.full((V,), 5)})
    torch.testing.assert_close(log_p, every.logsumexp(0))


@pytest.mark.parametrize("rank", [None, 2])
def test_hmm_empty_batch_gives_empty_results(rank):
    model = HMMLanguageModel(V, 3, 8, transition_rank=rank)
    batch = {"targets": torch.zeros(0, 5, dtype=torch.long), "lengths": torch.zeros(0, dtype=torch.long)}
    assert model.log_marginal(batch).shape == (0,)
    assert model.num_tokens(batch).shape == (0,)
    loss = model.loss(batch)
    assert loss.value.item() == 0.0
    loss.value.backward()  # an empty batch is still part of the graph


@pytest.mark.parametrize("name", ["soft-head", "latent-head", "copy-head"])
def test_seq2seq_heads_nan_is_an_error_or_a_nan_loss(name, validating):
    head, context, _ = _heads()[name]
    hidden, *_ = _inputs()
    key = "attentional" if name == "copy-head" else "hidden"
    given = {"hidden": hidden.clone(), **context}
    given[key] = given[key].clone()
    given[key][0, 0, 0] = math.nan
    targets = torch.zeros(B, T, dtype=torch.long)
    if validating:
        with pytest.raises(ValueError, match="hidden"):
            head.log_prob(given.pop("hidden"), targets, **given)
        return
    assert torch.isnan(head.log_prob(given.pop("hidden"), targets, **given)[0, 0])


def test_a_half_precision_alignment_counts_as_normalised():
    layer = _copy().to(torch.bfloat16)
    hidden, _, _, targets, src_ext = _inputs()
    scores = torch.randn(B, T, S, dtype=torch.float32).masked_fill(~MASK[:, None], -math.inf)
    log_alpha = torch.log_softmax(scores.to(torch.bfloat16), -1)
    out = layer(hidden.to(torch.bfloat16), log_alpha, src_ext, targets)
    assert torch.isfinite(out.log_prob).all()


def test_latent_attention_refuses_alignment_mass_on_padded_sources():
    layer = LatentAttention(4, 4, 7)
    hidden, memory = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    log_alpha = torch.full((1, 2, 3), 1 / 3).log()  # uniform over all three, padding included
    with pytest.raises(ValueError, match="padded source positions"):
        layer.log_prob(
            hidden, torch.zeros(1, 2, dtype=torch.long), memory=memory, memory_mask=mask, log_alpha=log_alpha
        )
    ok = torch.tensor([0.5, 0.5, 0.0]).log().expand(1, 2, 3)
    layer.log_prob(hidden, torch.zeros(1, 2, dtype=torch.long), memory=memory, memory_mask=mask, log_alpha=ok)
