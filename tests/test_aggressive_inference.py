"""The trainer's aggressive inference-network schedule (He et al. 2019): the inner loop moves the
encoder only and stops by its rule, the update after it moves the decoder only, the MI rule
switches the schedule off, NaN batches are skipped, and a resumed run is bit-identical."""

import json
import math
from dataclasses import replace

import pytest
import torch
from contract import NaiveBayesMixture, ToyCorpus, mixture_batches

from latentnlp.models import SentenceVAE
from latentnlp.schedules import LinearWarmup
from latentnlp.training import AggressiveInference, TrainConfig, Trainer
from latentnlp.training import loop as loop_module
from latentnlp.training.aggressive import StallRule, mutual_information_climbs

V = 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vae(**kwargs):
    torch.manual_seed(0)
    return SentenceVAE(V, 8, 10, 3, bos_id=0, eos_id=1, **kwargs)


def data():
    return ToyCorpus(mixture_batches(6, vocab_size=V)), ToyCorpus(mixture_batches(2, vocab_size=V, seed=1))


def config(tmp_path=None, aggressive=None, **kw):
    kw.setdefault("lr", 1e-2)
    kw.setdefault("max_epochs", 2)
    return TrainConfig(
        objective="elbo",
        objective_kwargs={"kl_weight": LinearWarmup(0.1, 1.0, 8)},
        log_every=1,
        progress=False,
        device="cpu",
        output_dir=str(tmp_path) if tmp_path else None,
        aggressive_inference=aggressive or AggressiveInference(max_inner_steps=7, window=2),
        **kw,
    )


def events(path, kind):
    return [e for e in map(json.loads, open(path / "metrics.jsonl")) if e["event"] == kind]


def decoder_state(model):
    inference = {id(p) for p in model.inference_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in inference}


def encoder_state(model):
    inference = {id(p) for p in model.inference_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in inference}


def test_the_config_serialises_and_refuses_bad_settings():
    cfg = config()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["aggressive_inference"] == {"max_inner_steps": 7, "window": 2, "mi_samples": 1}
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        AggressiveInference(window=0)
    with pytest.raises(ValueError, match="objective must be 'elbo' or 'iwae', got 'marginal'"):
        TrainConfig(aggressive_inference=AggressiveInference())
    with pytest.raises(ValueError, match="inference_parameters"):
        Trainer(NaiveBayesMixture(V, 3), config(), *data())


def test_sentence_vae_names_its_encoder_as_the_inference_network():
    model = vae()
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.inference_parameters())}
    assert names and all(n.startswith(("encoder", "posterior_params")) for n in names)
    assert len(names) < len(list(model.parameters()))


def test_stall_rule_stops_at_the_first_window_that_does_not_improve():
    """Constructed per-token losses in windows of 3: 5, 4, 3.5, then 3.5 again (no improvement)."""
    rule = StallRule(3)
    losses = [5, 5, 5, 4, 4, 4, 3, 4, 3.5, 3.5, 3.5, 3.5, 1, 1]
    stops = [rule.update(10 * x, 10) for x in losses]
    assert stops.index(True) == 11 and not any(stops[:11])
    # the window mean is per token: one long batch of low loss outweighs two short ones
    rule = StallRule(2)
    assert not rule.update(2.0 * 1, 1) and not rule.update(2.0 * 1, 1)  # window mean 2
    assert not rule.update(1.0 * 8, 8) and not rule.update(9.0 * 1, 1)  # (8 + 9) / 9 < 2: improved
    assert mutual_information_climbs(-math.inf, 0.1) and not mutual_information_climbs(0.5, 0.4)


def test_the_inner_loop_stops_when_its_rule_says_so(monkeypatch):
    """The trainer's inner loop ends at the first window the rule reports stalled, else at the cap."""
    decisions = []

    class Recording(StallRule):
        def update(self, loss_sum, tokens):
            decisions.append(super().update(loss_sum, tokens))
            return decisions[-1]

    monkeypatch.setattr(loop_module, "StallRule", Recording)
    trainer = Trainer(vae(), config(aggressive=AggressiveInference(max_inner_steps=40, window=2), lr=0.3), *data())
    torch.manual_seed(3)
    counts = []
    for _ in range(4):
        decisions.clear()
        counts.append(trainer._inner_updates(0))
        assert len(decisions) == counts[-1]
        assert decisions[-1] or counts[-1] == 40
        assert not any(decisions[:-1])
    assert any(c < 40 for c in counts)


def test_inner_steps_move_the_encoder_only_and_the_update_the_decoder_only():
    model = vae()
    trainer = Trainer(model, config(), *data())
    torch.manual_seed(1)
    before_dec, before_enc = decoder_state(model), encoder_state(model)
    made = trainer._inner_updates(0)
    assert 1 <= made <= 7 and (made == 7 or made % 2 == 0)
    after_dec, after_enc = decoder_state(model), encoder_state(model)
    assert all(torch.equal(before_dec[n], after_dec[n]) for n in before_dec)
    assert all(not torch.equal(before_enc[n], after_enc[n]) for n in ("encoder.weight_ih_l0", "posterior_params.bias"))
    assert all(p.grad is None for p in model.parameters())

    # a whole update under the schedule: the encoder moves by the inner steps alone
    model2 = vae()
    trainer2 = Trainer(model2, config(max_steps=1), *data())
    trainer2.state.aggressive = True
    batch = next(iter(trainer2.train_data.iterate(0)))
    inner_enc = {}

    def inner(position):
        made = Trainer._inner_updates(trainer2, position)
        inner_enc.update(encoder_state(model2))
        return made

    trainer2._inner_updates = inner
    start_dec = decoder_state(model2)
    assert trainer2._train_step(batch, 0)[0]
    assert all(torch.equal(inner_enc[n], p) for n, p in encoder_state(model2).items())
    assert any(not torch.equal(start_dec[n], p) for n, p in decoder_state(model2).items())


def test_mi_rule_switches_the_schedule_off_and_steps_are_logged(tmp_path, monkeypatch):
    """Validation MI made to read 1.0, 2.0, 1.5: on after epochs 1 and 2, off after epoch 3."""
    readings = iter([1.0, 2.0, 1.5, 9.0])
    monkeypatch.setattr(loop_module, "validation_posterior", lambda *a, **k: {"mi": next(readings), "active_units": 1})
    summary = Trainer(vae(), config(tmp_path, max_epochs=4), *data()).fit()
    checks = events(tmp_path, "posterior")
    assert [(e["epoch"], e["mi"], e["aggressive"]) for e in checks] == [(0, 1.0, True), (1, 2.0, True), (2, 1.5, False)]
    logs = events(tmp_path, "log")
    assert len(logs) == 4 * 6 and all(e["aggressive"] == (e["epoch"] < 3) for e in logs)
    assert all(e["inner_steps"] >= 1 for e in logs if e["epoch"] < 3)
    assert all(e["inner_steps"] == 0 for e in logs if e["epoch"] == 3)
    assert summary["inner_steps"] == sum(e["inner_steps"] for e in logs)


def test_posterior_diagnostics_are_logged_every_epoch(tmp_path):
    """The MI estimate lies in [0, log N] (N validation sentences); without the schedule,
    posterior_diagnostics logs it (and the active units) after every epoch."""
    Trainer(vae(), config(tmp_path / "a", max_epochs=1), *data()).fit()
    (check,) = events(tmp_path / "a", "posterior")
    assert math.isfinite(check["mi"]) and -0.1 <= check["mi"] <= math.log(2 * 8) + 0.1 and check["aggressive"]
    plain = replace(config(tmp_path / "b"), aggressive_inference=None, posterior_diagnostics=True)
    Trainer(vae(), plain, *data()).fit()
    checks = events(tmp_path / "b", "posterior")
    assert [e["epoch"] for e in checks] == [0, 1] and all("aggressive" not in e for e in checks)
    assert all(0 <= e["active_units"] <= 3 for e in checks)
    assert all("inner_steps" not in e for e in events(tmp_path / "b", "log"))


def test_a_vmf_latent_gets_the_diagnostics_and_the_schedule(tmp_path):
    """A vMF posterior (batch [B], event [D]) is read like a Gaussian one: the aggressive schedule
    and the per-epoch diagnostics run, MI within [0, log N], active units within [0, D]."""
    Trainer(vae(latent="vmf", concentration=5.0), config(tmp_path, max_epochs=2), *data()).fit()
    checks = events(tmp_path, "posterior")
    assert [e["epoch"] for e in checks] == [0, 1]
    assert all(-0.1 <= e["mi"] <= math.log(2 * 8) + 0.1 and 0 <= e["active_units"] <= 3 for e in checks)
    assert sum(e["inner_steps"] for e in events(tmp_path, "log")) > 0


def test_nan_inner_batches_are_skipped(tmp_path):
    """One training batch gives a NaN loss: inner steps drawing it are skipped, nothing turns NaN."""
    train, valid = data()
    train.batches[2] = dict(train.batches[2], nan=True)

    class Poisoned(SentenceVAE):
        def loss(self, batch, objective="marginal", **kwargs):
            out = super().loss(batch, objective, **kwargs)
            if batch.get("nan"):
                out.value = out.value + float("nan")
            return out

    torch.manual_seed(0)
    model = Poisoned(V, 8, 10, 3, bos_id=0, eos_id=1)
    summary = Trainer(model, config(tmp_path), train, valid).fit()
    skips = events(tmp_path, "skip")
    assert any(e["reason"] == "non-finite loss in an inner step" for e in skips)
    assert summary["skipped"] == len(skips) and summary["steps"] == 2 * 6 - sum(
        e["reason"] == "non-finite loss" for e in skips
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Stopping mid-epoch (after 4 of 12 updates) and resuming ends with the parameters, the
    encoder's optimiser state and the run log of a straight run."""

    def fit(folder, max_steps, **kw):
        model = vae(word_dropout=0.2, unk_id=2)
        trainer = Trainer(model, config(tmp_path / folder, max_steps=max_steps, checkpoint_every=4, **kw), *data())
        return model, trainer, trainer.fit()

    straight, t1, _ = fit("straight", 9)
    fit("resumed", 4)
    (tmp_path / "resumed" / "finished.json").unlink()
    resumed, t2, summary = fit("resumed", 9)
    assert summary["resumed"] and summary["steps"] == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    s1, s2 = t1.encoder_optimizer.state_dict()["state"], t2.encoder_optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)

    def strip(e):
        return {k: v for k, v in e.items() if k not in ("wall_time", "tokens_per_s")}

    assert [strip(e) for e in events(tmp_path / "straight", "log")] == [
        strip(e) for e in events(tmp_path / "resumed", "log")
    ]
