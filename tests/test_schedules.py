"""latentnlp.schedules: the formulas, JSON round trips, equality and the registry."""

import json
import math

import pytest

from latentnlp.schedules import Constant, CosineDecay, Cyclical, LinearDecay, LinearWarmup, Schedule, Warmup

ALL = [
    Constant(0.3),
    LinearWarmup(0.1, 1.0, 10),
    Cyclical(period=8, ratio=0.25, cycles=2),
    Warmup(3),
    LinearDecay(total=10, warmup=2, floor=0.1),
    CosineDecay(total=10),
]


def test_constant():
    assert [Constant(0.3)(t) for t in (0, 5, 10**6)] == [0.3] * 3


def test_linear_warmup_is_bowmans_kl_annealing():
    s = LinearWarmup(0.0, 1.0, 4)
    assert [s(t) for t in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LinearWarmup(0.2, 1.0, 2)(1) == pytest.approx(0.6)


def test_cyclical_rises_within_each_cycle_then_holds():
    s = Cyclical(period=4, ratio=0.5, cycles=2)
    assert [s(t) for t in range(10)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    forever = Cyclical(period=4, ratio=0.5, start=0.2, end=0.6)
    assert forever(12) == 0.2 and forever(13) == pytest.approx(0.4)


def test_learning_rate_multipliers():
    assert [Warmup(2)(t) for t in range(4)] == [0.5, 1.0, 1.0, 1.0]
    linear = LinearDecay(total=8, warmup=2, floor=0.1)
    assert [linear(t) for t in range(3)] == [0.5, 1.0, 1.0]
    assert linear(5) == pytest.approx(0.1 + 0.9 * (1 - 3 / 6)) and linear(100) == pytest.approx(0.1)
    cosine = CosineDecay(total=8, warmup=2, floor=0.1)
    assert cosine(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert cosine(8) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_round_trip_and_equality(schedule):
    data = json.loads(json.dumps(schedule.to_dict()))
    assert data["schedule"] == schedule.name and Schedule.is_serialised(data)
    again = Schedule.from_dict(data)
    assert again == schedule and hash(again) == hash(schedule)
    assert [again(t) for t in range(20)] == [schedule(t) for t in range(20)]


def test_unequal_parameters_unequal_schedules():
    assert LinearWarmup(0.0, 1.0, 10) != LinearWarmup(0.0, 1.0, 11)
    assert Constant(1.0) != Warmup(1)


def test_unknown_names_and_bad_parameters():
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        Schedule.from_dict({"schedule": "exp"})
    assert not Schedule.is_serialised({"schedule": "exp"})
    for bad in (
        lambda: LinearWarmup(0, 1, 0),
        lambda: Cyclical(period=0),
        lambda: Cyclical(4, ratio=0),
        lambda: Warmup(0),
    ):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("schedule", [LinearDecay, CosineDecay])
@pytest.mark.parametrize(
    "kwargs, message",
    [({"total": 0}, "total"), ({"total": 10, "warmup": -1}, "warmup"), ({"total": 10, "floor": 1.5}, "floor")],
)
def test_decay_schedules_refuse_bad_arguments(schedule, kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedule(**kwargs)
