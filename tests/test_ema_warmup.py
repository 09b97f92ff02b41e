"""train.ema_warmup: the EMA decay of update t is min(ema, (1 + t) / (10 + t)).

Checked against a plain-Python loop of the same rule, for the share of the initial weights
(the reason for the option: a 0.999 EMA over 1,110 steps kept 33% of the random init in the
2026-12-03 quality-study exports), and through the trainer including a resume, which must
continue the warm-up where it stopped (``num_updates`` is restored).
"""

from pathlib import Path

import pytest
import torch
from test_trainer import assert_runs_identical, read_run, toy_cfg
from torch import nn

from maskar import checkpoint as ck
from maskar.train.ema import EMA
from maskar.train.trainer import train


def _reference_ema(init: torch.Tensor, values: list[torch.Tensor], decay: float, warmup: bool):
    shadow = init.double().clone()
    for t, v in enumerate(values):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        shadow = d * shadow + (1 - d) * v.double()
    return shadow


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_reference_rule(warmup: bool) -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(3, 2)
    init = lin.weight.detach().clone()
    ema = EMA(list(lin.named_parameters()), decay=0.95, warmup=warmup)
    values = [torch.randn(2, 3, generator=g) for _ in range(200)]  # the warm-up ends at t = 170
    for v in values:
        with torch.no_grad():
            lin.weight.copy_(v)
        ema.update()
    want = _reference_ema(init, values, 0.95, warmup)
    torch.testing.assert_close(ema.state_dict()["weight"].double(), want, rtol=0, atol=1e-5)


def test_warmup_removes_the_initialisation_and_switches_to_the_plain_decay() -> None:
    p = nn.Parameter(torch.zeros(1))
    ema = EMA([("p", p)], decay=0.9, warmup=True)
    decays = []
    for _ in range(100):
        decays.append(ema.current_decay())
        ema.update()
    assert decays[:3] == [pytest.approx(1 / 10), pytest.approx(2 / 11), pytest.approx(3 / 12)]
    # (1 + t) / (10 + t) > 0.9 from t = (10 * 0.9 - 1) / 0.1 = 80 on: the plain decay after that
    assert decays[79] == pytest.approx(80 / 89) and decays[80:] == [0.9] * 20
    # The share of the initial value after T updates: the product of the decays.
    share_warm = torch.tensor(decays[:50], dtype=torch.float64).prod().item()
    assert share_warm < 1e-8 and 0.9**50 > 5e-3
    # A constant parameter: both EMAs converge to it, the warm-up one much faster.
    plain = EMA([("p", p)], decay=0.9)
    warm = EMA([("p", p)], decay=0.9, warmup=True)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(20):
        plain.update()
        warm.update()
    assert 1 - warm.shadow["p"].item() < 1e-4 < 1 - plain.shadow["p"].item()


def test_trainer_ema_warmup_resumes_where_it_stopped(tmp_path: Path) -> None:
    flags = ["train.ema=0.99", "train.ema_warmup=true", "train.steps=6", "train.ckpt_every=0"]
    train(toy_cfg(tmp_path / "a", *flags))
    cfg_b = toy_cfg(tmp_path / "b", *flags)
    train(cfg_b, stop_at=3)
    train(cfg_b)
    a, b = read_run(tmp_path / "a"), read_run(tmp_path / "b")
    assert_runs_identical(a, b)  # weights, EMA (so the resumed warm-up) and optimizer state
    # The EMA does not change training: the same weights as a plain 0.99 EMA run, another shadow
    # (the plain one is still 0.99^6 = 94% the initial weights).
    train(toy_cfg(tmp_path / "plain", "train.ema=0.99", "train.steps=6", "train.ckpt_every=0"))
    plain = read_run(tmp_path / "plain")
    for k in a["model"]:
        assert torch.equal(plain["model"][k], a["model"][k])
    assert max((a["ema"][k] - plain["ema"][k]).abs().max().item() for k in a["ema"]) > 1e-3
    state = ck.load_trainer_state(ck.latest_checkpoint(tmp_path / "b"))
    assert state["ema"]["num_updates"] == 6
