"""The shared training machinery: LR schedule, optimizer groups, RNG capture, logging."""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest
import torch

from lillm.model import LilLM, ModelConfig
from lillm.devices import resolve_device, resolve_dtype
from lillm.train import RunLogger, lr_at, make_optimizer, restore_rng_state, rng_state


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == 0.1
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_only_on_matrices():
    model = LilLM(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    decay, no_decay = make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_logger_writes_csv_and_plot(tmp_path):
    logger = RunLogger(tmp_path)
    for step in range(1, 6):
        logger.log(step, train_loss=5.0 / step)
    logger.log(5, val_loss=1.5)
    plot = logger.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["train_loss"]) for r in rows if r["train_loss"]] == [5.0, 2.5, 5 / 3, 1.25, 1.0]
    assert float(rows[-1]["val_loss"]) == 1.5
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
