"""LatentAttention against explicit enumeration (float64)."""

import pytest
import torch

from latentnlp.layers.latent_attention import LatentAttention

B, T, S, H, HS, V = 3, 4, 5, 6, 7, 11
LENGTHS = torch.tensor([5, 3, 1])

pytestmark = pytest.mark.usefixtures("float64")  # every test computes in float64


def _inputs(seed=0, s=S):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    memory = torch.randn(B, s, HS, generator=g)
    mask = torch.arange(s) < LENGTHS[:, None]
    targets = torch.randint(V, (B, T), generator=g)
    return hidden, memory, mask, targets


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("score", "mlp")
    return LatentAttention(H, kw.pop("memory_size", HS), V, **kw).eval()


def _enumerate(layer, hidden, memory, mask, targets):
    """Loop over (b, t, m): log alpha, log p(y_t | h_t, s_m), marginal log p(y_t) and full [V]."""
    scores = layer.scores(hidden, memory)
    log_p = torch.zeros(B, T)
    full = torch.zeros(B, T, V)
    emission = torch.full((B, T, memory.shape[1]), float("-inf"))
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(T):
            log_alpha = torch.log_softmax(scores[b, t, :n], 0)
            terms, dists = [], []
            for m in range(n):
                o = torch.tanh(layer.out_query(hidden[b, t]) + layer.out_context(memory[b, m]))
                dist = torch.log_softmax(layer.output_projection(o), 0)
                emission[b, t, m] = dist[targets[b, t]]
                terms.append(log_alpha[m] + dist[targets[b, t]])
                dists.append(log_alpha[m] + dist)
            log_p[b, t] = torch.logsumexp(torch.stack(terms), 0)
            full[b, t] = torch.logsumexp(torch.stack(dists), 0)
    return log_p, full, emission


@pytest.mark.parametrize("score", ["mlp", "bilinear", "dot"])
def test_exact_marginal_equals_enumeration(score):
    kw = {"memory_size": H} if score == "dot" else {}
    layer = _layer(score=score, **kw)
    hidden, memory, mask, targets = _inputs()
    if score == "dot":
        memory = memory[..., :H].contiguous()
    out = layer(hidden, memory, mask, targets, full=True)
    log_p, full, emission = _enumerate(layer, hidden, memory, mask, targets)
    torch.testing.assert_close(out.log_prob, log_p)
    torch.testing.assert_close(out.log_probs, full)
    torch.testing.assert_close(out.log_emission, emission)
    torch.testing.assert_close(out.log_probs.logsumexp(-1), torch.zeros(B, T))
    torch.testing.assert_close(out.log_alpha.logsumexp(-1), torch.zeros(B, T))
    assert torch.isneginf(out.log_alpha[~mask[:, None, :].expand(B, T, S)]).all()
    torch.testing.assert_close(out.log_probs.gather(-1, targets[..., None]).squeeze(-1), out.log_prob)


def test_soft_mode_is_context_inside_softmax():
    layer = _layer(mode="soft")
    hidden, memory, mask, targets = _inputs()
    out = layer(hidden, memory, mask, targets, full=True)
    alpha = out.log_alpha.exp()
    context = torch.einsum("bts,bsd->btd", alpha, memory)
    o = torch.tanh(layer.out_query(hidden) + layer.out_context(context))
    ref = torch.log_softmax(layer.output_projection(o), -1)
    torch.testing.assert_close(out.log_probs, ref)
    torch.testing.assert_close(out.log_prob, ref.gather(-1, targets[..., None]).squeeze(-1))
    torch.testing.assert_close(out.context, context)
    assert out.log_emission is None
    torch.testing.assert_close(out.log_probs.logsumexp(-1), torch.zeros(B, T))
    # the same parameters in exact mode give a different (but normalised) model
    layer.mode = "exact"
    exact = layer(hidden, memory, mask, targets, full=True)
    torch.testing.assert_close(exact.log_probs.logsumexp(-1), torch.zeros(B, T))


def test_chunking_gives_identical_values_and_gradients():
    hidden, memory, mask, targets = _inputs()
    results = []
    for max_elements in (2**24, B * T * V * 2, 1):  # one chunk, chunks of 2, chunks of 1
        layer = _layer(max_chunk_elements=max_elements).train()  # dropout 0: train == eval
        q = hidden.clone().requires_grad_()
        mem = memory.clone().requires_grad_()
        out = layer(q, mem, mask, targets, full=True)
        (out.log_prob.sum() + out.log_probs[..., :3].sum()).backward()
        grads = [q.grad, mem.grad] + [p.grad for p in layer.parameters()]
        assert all(torch.isfinite(g).all() for g in grads)
        results.append((out.log_prob.detach(), out.log_probs.detach(), grads))
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0])
        torch.testing.assert_close(other[1], results[0][1])
        for a, b in zip(other[2], results[0][2]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["exact", "soft"])
def test_padding_invariance(mode):
    layer = _layer(mode=mode, max_chunk_elements=B * T * V)  # chunked: padded chunks included
    hidden, memory, mask, targets = _inputs()
    g = torch.Generator().manual_seed(9)
    padded = torch.cat([memory, 100 * torch.randn(B, 3, HS, generator=g)], 1)
    pmask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.bool)], 1)
    garbage = padded.clone()
    garbage[~pmask] = 50 * torch.randn(int((~pmask).sum()), HS, generator=g)
    a = layer(hidden, memory, mask, targets, full=True)
    mem = garbage.clone().requires_grad_()
    b = layer(hidden, mem, pmask, targets, full=True)
    torch.testing.assert_close(a.log_prob, b.log_prob)
    torch.testing.assert_close(a.log_probs, b.log_probs)
    torch.testing.assert_close(a.log_alpha, b.log_alpha[..., :S])
    (b.log_prob.sum() + b.log_probs.logsumexp(-1).sum()).backward()
    assert torch.isfinite(mem.grad).all()
    assert (mem.grad[~pmask] == 0).all()


def test_log_prob_at_matches_emission_terms():
    layer = _layer()
    hidden, memory, mask, targets = _inputs()
    out = layer(hidden, memory, mask, targets)
    g = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randint(int(n), (T,), generator=g) for n in LENGTHS])  # [B, T]
    index = torch.stack([index, torch.zeros_like(index)])  # [2, B, T]
    at = layer.log_prob_at(hidden, memory, index, targets)
    assert at.shape == (2, B, T)
    torch.testing.assert_close(at, out.log_emission.gather(-1, index.movedim(0, -1)).movedim(-1, 0))


def test_alignment_distribution_and_argument_checks():
    layer = _layer()
    hidden, memory, mask, targets = _inputs()
    prior = layer.alignment(hidden, memory, mask)
    assert prior.batch_shape == (B, T)
    torch.testing.assert_close(prior.probs.sum(-1), torch.ones(B, T))
    with pytest.raises(ValueError, match="hidden"):
        layer(hidden[..., :2], memory, mask)
    with pytest.raises(ValueError, match="memory_mask"):
        layer(hidden, memory, mask.long())
    with pytest.raises(ValueError, match="targets"):
        layer(hidden, memory, mask, targets[:, :2])
    with pytest.raises(ValueError, match="mode"):
        LatentAttention(H, HS, V, mode="hard")
    with pytest.raises(ValueError, match="dot"):
        LatentAttention(H, HS, V, score="dot")


@pytest.mark.parametrize("mode", ["exact", "soft"])
def test_step_wise_calls_equal_one_call_and_give_the_fed_vector(mode):
    """T = 1 at a time (an input-feeding decoder) gives what one call over all T gives, and o_t."""
    layer = _layer(mode=mode)
    hidden, memory, mask, targets = _inputs()
    whole = layer(hidden, memory, mask, targets, full=True)
    steps = [layer(hidden[:, t : t + 1], memory, mask, targets[:, t : t + 1], full=True) for t in range(T)]
    for name in ("log_prob", "log_probs", "log_alpha", "context", "attentional"):
        torch.testing.assert_close(torch.cat([getattr(s, name) for s in steps], 1), getattr(whole, name))
    context = torch.bmm(whole.log_alpha.exp(), memory)
    expected = torch.tanh(layer.out_query(hidden) + layer.out_context(context))
    torch.testing.assert_close(whole.attentional, expected)
    assert whole.attentional.shape == (B, T, layer.projection_size)
    if mode == "soft":  # soft attention reads out the fed vector itself
        torch.testing.assert_close(whole.log_probs, torch.log_softmax(layer.output_projection(expected), -1))


@pytest.mark.parametrize("name", ["SoftmaxOutput", "MixtureOfSoftmaxes", "LatentAttention", "CopyGenerator"])
def test_every_layer_ties_its_output_projection(name):
    import latentnlp.layers as layers

    sizes = {"SoftmaxOutput": (H, V), "MixtureOfSoftmaxes": (H, V, 2), "LatentAttention": (H, HS, V)}
    layer = getattr(layers, name)(*sizes.get(name, (H, V)))
    embedding = torch.nn.Embedding(V, H)
    layer.tie_weights(embedding)
    assert layer.output_projection.weight is embedding.weight
    with pytest.raises(ValueError, match=r"embedding.weight must be \(11, 6\)"):
        layer.tie_weights(torch.nn.Embedding(V, H + 1))


def test_forward_returns_log_prob_and_log_probs_first_in_every_layer():
    from latentnlp.layers import CopyGenerator, MixtureOfSoftmaxes, SoftmaxOutput

    hidden, memory, mask, targets = _inputs()
    log_alpha = _layer().alignment(hidden, memory, mask).logits
    src_ext = torch.randint(0, V, (B, S))
    calls = {
        "softmax": lambda **kw: SoftmaxOutput(H, V)(hidden, targets, **kw),
        "mos": lambda **kw: MixtureOfSoftmaxes(H, V, 2)(hidden, targets, **kw),
        "attention": lambda **kw: _layer()(hidden, memory, mask, targets, **kw),
        "copy": lambda **kw: CopyGenerator(H, V)(hidden, log_alpha, src_ext, targets, **kw),
    }
    for name, call in calls.items():
        torch.manual_seed(0)
        out = call()
        assert out._fields[:2] == ("log_prob", "log_probs"), name
        assert out.log_prob.shape == (B, T) and out.log_probs is None, name
        torch.manual_seed(0)
        both = call(full=True)
        torch.testing.assert_close(both.log_probs.gather(-1, targets[..., None])[..., 0], both.log_prob)


def test_top_k_is_exact_when_k_covers_the_source():
    hidden, memory, mask, targets = _inputs()
    exact = _layer()(hidden, memory, mask, targets, full=True)
    for k in (S, S + 3):
        pruned = _layer(top_k=k)(hidden, memory, mask, targets, full=True)
        torch.testing.assert_close(pruned.log_prob, exact.log_prob, rtol=0, atol=0)
        torch.testing.assert_close(pruned.log_probs, exact.log_probs, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_is_the_enumeration_over_the_kept_positions_and_a_lower_bound(k):
    hidden, memory, mask, targets = _inputs()
    exact = _layer()(hidden, memory, mask, targets)
    layer = _layer(top_k=k)
    q = hidden.clone().requires_grad_()
    pruned = layer(q, memory, mask, targets, full=True)
    kept = exact.log_alpha.topk(k, -1).indices
    expected = torch.logsumexp(exact.log_alpha.gather(-1, kept) + exact.log_emission.gather(-1, kept), -1)
    torch.testing.assert_close(pruned.log_prob, expected)
    assert (pruned.log_prob <= exact.log_prob + 1e-12).all()
    assert (pruned.log_prob < exact.log_prob - 1e-6).any()  # rows with more than k positions lose mass
    short = LENGTHS <= k  # every real position kept: exact there
    torch.testing.assert_close(pruned.log_prob[short], exact.log_prob[short])
    dropped = torch.ones_like(mask[:, None, :].expand(B, T, S)).scatter(-1, kept, False)
    assert torch.isneginf(pruned.log_emission[dropped]).all()
    torch.testing.assert_close(pruned.log_probs.gather(-1, targets[..., None])[..., 0], pruned.log_prob)
    pruned.log_prob.sum().backward()
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="top_k"):
        _layer(mode="soft", top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        _layer(top_k=0)
