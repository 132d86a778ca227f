"""The OutputHead seam: every head keeps the protocol, heads swap on one decoder, the seq2seq modes are
compositions whose pieces agree with enumeration."""

import inspect

import pytest
import torch
from test_latent_alignment import BOS, EOS, UNK, V, make_batch
from torch.distributions import Distribution

from latentnlp import estimators
from latentnlp.layers import CopyGenerator, LatentAttention, MixtureOfSoftmaxes, OutputHead, SoftmaxOutput
from latentnlp.models.latent_alignment import MODES, TOP_K, LatentAlignmentSeq2Seq, PrunedMarginal
from latentnlp.models.seq2seq import (
    AlignmentELBO,
    AttentionalEncoderDecoder,
    CopyHead,
    LatentAttentionHead,
    Marginal,
    SoftAttentionHead,
)
from latentnlp.models.seq2seq.objectives import enumerate_alignments, relax_alignments, sample_alignments

pytestmark = pytest.mark.usefixtures("float64")

B, T, S, H = 3, 4, 5, 6
LENGTHS = torch.tensor([5, 3, 1])


def _context(seed=0):
    """What a tiny attentional decoder hands its head: states, memory, alignments, copy ids."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    memory = torch.randn(B, S, H, generator=g)
    mask = torch.arange(S) < LENGTHS[:, None]
    log_alpha = torch.log_softmax(torch.randn(B, T, S, generator=g).masked_fill(~mask[:, None], -torch.inf), -1)
    context = {
        "memory": memory,
        "memory_mask": mask,
        "log_alpha": log_alpha,
        "attentional": torch.tanh(torch.randn(B, T, H, generator=g)),
        "src_ext": torch.randint(0, V + 2, (B, S), generator=g),
        "extended_size": V + 2,
    }
    return hidden, context


def _heads():
    torch.manual_seed(0)
    attention = LatentAttention(H, H, V)
    return {
        "softmax": SoftmaxOutput(H, V, 4),
        "mos": MixtureOfSoftmaxes(H, V, 3, 4),
        "latent-attention-soft": LatentAttention(H, H, V, mode="soft"),
        "latent-attention-exact": LatentAttention(H, H, V, mode="exact"),
        "copy-generator": CopyGenerator(H, V),
        "soft-head": SoftAttentionHead(attention),
        "latent-head": LatentAttentionHead(attention),
        "copy-head": CopyHead(
            CopyGenerator(H, V, output_projection=attention.output_projection), shared_vocabulary=True
        ),
    }


@pytest.mark.parametrize("name", list(_heads()))
def test_every_head_keeps_the_protocol(name):
    """Swapped into the same decoder with the same context: normalised, and log_prob = log_probs gathered."""
    head = _heads()[name].eval()
    assert isinstance(head, OutputHead)
    hidden, context = _context()
    log_probs = head.log_probs(hidden, **context)
    assert log_probs.shape[:2] == (B, T)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(B, T))
    targets = torch.randint(0, log_probs.shape[-1], (B, T), generator=torch.Generator().manual_seed(1))
    log_prob = head.log_prob(hidden, targets, **context)
    assert log_prob.shape == (B, T)
    torch.testing.assert_close(log_prob, log_probs.gather(-1, targets[..., None])[..., 0])


@pytest.mark.parametrize(
    "name,method",
    [(n, m) for n, h in _heads().items() for m in ("log_prob", "log_probs", "exact_log_prob") if hasattr(h, m)],
)
def test_every_head_refuses_an_unknown_context_keyword(name, method):
    """A misspelt keyword is a TypeError naming it and the accepted ones; every keyword of the
    protocol's context is accepted (the ones a head does not use are ignored), and the decoder
    states are passed as ``hidden`` to every head."""
    head = _heads()[name].eval()
    hidden, context = _context()
    call = getattr(head, method)
    args = () if method == "log_probs" else (torch.zeros(B, T, dtype=torch.long),)
    expected = call(hidden, *args, **context)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'memory_mak'; it accepts .*memory_mask"):
        call(hidden, *args, **{**context, "memory_mak": context["memory_mask"]})
    with pytest.raises(TypeError, match=r"'max_chunk_element', 'srcext'; it accepts .*src_ext"):
        call(hidden, *args, **context, srcext=context["src_ext"], max_chunk_element=10)
    # everything by keyword, the decoder states as hidden: the same result
    keywords = {"hidden": hidden, **({"targets": args[0]} if args else {}), **context}
    torch.testing.assert_close(call(**keywords), expected)
    assert next(iter(inspect.signature(call).parameters)) == "hidden"


def test_latent_head_is_the_enumerated_mixture():
    """``log p(y_t) = log sum_m alpha_tm p(y_t | h_t, s_m)`` with each term spelt out."""
    head = _heads()["latent-head"].eval()
    attention = head.attention
    hidden, context = _context(2)
    memory, mask, log_alpha = context["memory"], context["memory_mask"], context["log_alpha"]
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    expected = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            total = 0.0
            for m in range(int(mask[b].sum())):
                o = torch.tanh(attention.out_query(hidden[b, t]) + attention.out_context(memory[b, m]))
                total = (
                    total + log_alpha[b, t, m].exp() * torch.softmax(attention.output_projection(o), -1)[targets[b, t]]
                )
            expected[b, t] = total.log()
    torch.testing.assert_close(head.log_prob(hidden, targets, **context), expected)


def test_soft_and_latent_heads_agree_on_a_one_word_source():
    """With one source position the alignment is certain: soft context = the aligned state."""
    core = _model("exact").core
    batch = make_batch(torch.Generator().manual_seed(0), src_len=1)
    soft = LatentAlignmentSeq2Seq(core, SoftAttentionHead(core.attention))
    latent = LatentAlignmentSeq2Seq(core, LatentAttentionHead(core.attention))
    torch.testing.assert_close(soft.log_marginal(batch), latent.log_marginal(batch))


def _model(mode, seed=0):
    torch.manual_seed(seed)
    return (
        LatentAlignmentSeq2Seq.from_mode(
            mode, V, V, embedding_size=6, hidden_size=8, bos_id=BOS, eos_id=EOS, unk_id=UNK
        )
        .double()
        .eval()
    )


HEADS = {"soft": SoftAttentionHead, "exact": LatentAttentionHead, "copy": CopyHead}
ESTIMATORS = {"elbo-enum": enumerate_alignments, "elbo-sample": sample_alignments}


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_are_compositions(mode):
    model = _model(mode)
    assert isinstance(model.head, HEADS.get(mode, LatentAttentionHead))
    assert "objectives" not in vars(model)
    if mode.startswith("elbo"):
        assert isinstance(model.objective, AlignmentELBO) and model.objectives == ("elbo", "marginal")
        expected = ESTIMATORS.get(mode, relax_alignments)
        assert getattr(model.objective.estimator, "func", model.objective.estimator) is expected
        assert (model.objective.baseline is not None) == (mode == "elbo-sample")
    elif mode in TOP_K:  # the pruned bound is an ELBO without an inference network
        assert isinstance(model.objective, PrunedMarginal) and model.objectives == ("elbo", "marginal")
        assert model.head.top_k == TOP_K[mode]
        assert not any(name.startswith("objective.") for name, _ in model.named_parameters())
    else:  # no inference network where no ELBO is trained
        assert isinstance(model.objective, Marginal) and model.objectives == ("marginal",)
        assert not any(name.startswith("objective.") for name, _ in model.named_parameters())


@pytest.mark.parametrize("mode", ["exact", "elbo-sample", "copy"])
def test_from_mode_is_the_hand_built_composition(mode):
    """The same seed gives the same parameters and the same loss whether built by name or by hand."""
    by_name = _model(mode)
    torch.manual_seed(0)
    core = AttentionalEncoderDecoder(V, V, embedding_size=6, hidden_size=8)
    if mode == "copy":
        head = CopyHead(
            CopyGenerator(8, V, output_projection=core.attention.output_projection), shared_vocabulary=True, unk_id=UNK
        )
    else:
        head = LatentAttentionHead(core.attention)
    objective = AlignmentELBO(6, 8, "score_function") if mode == "elbo-sample" else Marginal()
    by_hand = LatentAlignmentSeq2Seq(core, head, objective, bos_id=BOS, eos_id=EOS).double().eval()
    for (name, a), (_, b) in zip(by_name.named_parameters(), by_hand.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    batch = make_batch(torch.Generator().manual_seed(1), extended=mode == "copy")
    for objective in by_name.objectives:
        torch.manual_seed(2)
        a = by_name.loss(batch, objective).value
        torch.manual_seed(2)
        b = by_hand.loss(batch, objective).value
        assert torch.equal(a, b), objective


def test_enumerated_elbo_at_the_exact_posterior_is_the_marginal_of_the_latent_head():
    model = _model("elbo-enum")
    batch = make_batch(torch.Generator().manual_seed(4))
    bound = model.elbo(batch, q=model.posterior(batch))
    torch.testing.assert_close(bound.value, model.log_marginal(batch), rtol=0, atol=1e-10)


def test_an_elbo_needs_a_latent_alignment():
    core = AttentionalEncoderDecoder(V, V, embedding_size=6, hidden_size=8)
    with pytest.raises(ValueError, match="latent"):
        LatentAlignmentSeq2Seq(core, SoftAttentionHead(core.attention), AlignmentELBO(6, 8))
    with pytest.raises(ValueError, match="estimator"):
        AlignmentELBO(6, 8, "wake-sleep")


def test_relaxed_estimate_is_the_hard_gumbel_sample_average():
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    values = torch.tensor([1.0, -2.0, 0.5])
    f = lambda z: (z * values).sum(-1)  # noqa: E731
    estimate = estimators.relaxed(f, logits, 0.5, num_samples=4, generator=torch.Generator().manual_seed(1))
    z = estimators.gumbel_softmax(logits.expand(4, 2, 3), 0.5, True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate.surrogate, f(z).mean(0))
    many = estimators.relaxed(f, logits, 0.5, num_samples=20000, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        many.value,
        estimators.exact(values.expand(2, 3), torch.distributions.Categorical(logits=logits)).value,
        atol=0.05,
        rtol=0,
    )


def test_validation_switch_governs_the_length_checks():
    """Value-range checks read from the device: only when validation is on."""
    model = _model("exact")
    batch = make_batch(torch.Generator().manual_seed(5))
    bad = {**batch, "tgt_lengths": batch["tgt_lengths"].clamp_min(batch["tgt_in"].shape[1]) + 1}
    with pytest.raises(ValueError, match="tgt_lengths"):
        model.log_marginal(bad)
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        assert model.log_marginal(bad).shape == (bad["src"].shape[0],)  # not checked
        with pytest.raises(ValueError, match="tgt_in"):  # shape checks stay on
            model.log_marginal({**batch, "tgt_in": batch["tgt_in"][:, None]})
    finally:
        Distribution.set_default_validate_args(previous)
    with pytest.raises(ValueError, match="tgt_lengths"):
        model.log_marginal(bad)


def test_pruned_latent_head_with_k_at_least_s_is_the_exact_head():
    """``top_k >= S`` keeps every source position: the same numbers as the exact head."""
    exact = _heads()["latent-head"].eval()
    hidden, context = _context(4)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    for k in (S, S + 3):
        pruned = LatentAttentionHead(exact.attention, top_k=k).eval()
        assert pruned.pruned
        torch.testing.assert_close(
            pruned.log_prob(hidden, targets, **context), exact.log_prob(hidden, targets, **context)
        )
        torch.testing.assert_close(pruned.log_probs(hidden, **context), exact.log_probs(hidden, **context))
        torch.testing.assert_close(
            pruned.exact_log_prob(hidden, targets, **context), exact.log_prob(hidden, targets, **context)
        )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pruned_latent_head_below_s_is_a_lower_bound(k):
    """``top_k < S``: the k largest prior terms of the enumerated sum, ``<=`` the exact marginal,
    equal on rows with at most k real source positions; ``exact_log_prob`` stays exact."""
    exact = _heads()["latent-head"].eval()
    pruned = LatentAttentionHead(exact.attention, top_k=k).eval()
    hidden, context = _context(6)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    full = exact.log_prob(hidden, targets, **context)
    bound = pruned.log_prob(hidden, targets, **context)
    assert (bound <= full + 1e-12).all()
    short = LENGTHS <= k
    torch.testing.assert_close(bound[short], full[short])
    if not short.all():
        assert (bound[~short] < full[~short]).any()
    torch.testing.assert_close(pruned.exact_log_prob(hidden, targets, **context), full)
    # the terms kept are those of the k highest priors, spelt out
    emission = exact.emission_log_probs(hidden, targets, context["memory"], context["memory_mask"])
    kept = context["log_alpha"].topk(k, -1).indices
    expected = (context["log_alpha"] + emission).gather(-1, kept).logsumexp(-1)
    torch.testing.assert_close(bound, expected)
    # the pruned distribution over the vocabulary is the same sum: a sub-distribution, gathered = log_prob
    log_probs = pruned.log_probs(hidden, **context)
    assert (log_probs.logsumexp(-1) <= 1e-12).all()
    torch.testing.assert_close(log_probs.gather(-1, targets[..., None])[..., 0], bound)


@pytest.mark.parametrize("mode,k", [("exact-top3", 3), ("exact-top5", 5), ("exact-top10", 10)])
def test_from_mode_builds_the_pruned_head(mode, k):
    """``exact-topK`` is the exact composition with ``top_k = K`` on the head: the same parameters,
    the same exact marginal, and an ELBO that is the pruned sum."""
    model = _model(mode)
    assert isinstance(model.head, LatentAttentionHead) and model.head.top_k == k and model.head.pruned
    assert isinstance(model.objective, PrunedMarginal) and model.objectives == ("elbo", "marginal")
    assert model.constructor["factory"] == "from_mode" and model.constructor["args"][0] == mode
    exact = _model("exact")
    for (name, a), (_, b) in zip(model.named_parameters(), exact.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    batch = make_batch(torch.Generator().manual_seed(8), src_len=6)
    log_px = model.log_marginal(batch)
    torch.testing.assert_close(log_px, exact.log_marginal(batch))
    torch.testing.assert_close(model.loss(batch, "marginal").metrics["nll"], -log_px)
    # the ELBO is the head's pruned log_prob summed over the target, below the exact marginal
    bound = model.elbo(batch)
    run = model.decode(batch)
    per_token = model.head.log_prob(run.hidden, batch["tgt_out"], **run.context)
    torch.testing.assert_close(bound.value, (per_token * run.target_mask).sum(1))
    torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)
    assert (bound.kl >= -1e-12).all()
    assert (bound.value <= log_px + 1e-12).all()
    if k < 6:
        assert (bound.value < log_px - 1e-9).any()
    else:  # k >= S: the restricted posterior is the posterior, the bound is tight
        torch.testing.assert_close(bound.value, log_px)
    # given the exact posterior as q, the bound is tight whatever k
    torch.testing.assert_close(model.elbo(batch, q=model.posterior(batch)).value, log_px)
    loss = model.loss(batch, "elbo")
    assert set(loss.metrics) == {"neg_elbo", "kl", "reconstruction", "tokens"}
    torch.testing.assert_close(loss.value, -bound.value.sum() / batch["tgt_lengths"].sum())
    with pytest.raises(ValueError, match="estimator"):
        model.elbo(batch, estimator="score_function")
