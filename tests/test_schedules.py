"""The one warmup-cosine schedule gives, to the last bit, the factors of the four copies it replaced."""

from __future__ import annotations

import math

import pytest

from polybridge.schedules import warmup_cosine


# What each former copy computed, verbatim: the branch trainer's lr_lambda, the tiny backbone's VAE and UNet
# stages, the native encoders' (with a 2% floor).
def _trainer(step, warmup, total, constant=False):
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if constant:
        return warm
    progress = min(step, total) / total
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def _backbone(step, warmup, total):
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _native(step, warmup, total):
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


@pytest.mark.parametrize("total", [1, 3, 7, 100, 700, 1600, 2000, 6000])
@pytest.mark.parametrize("warmup", [0, 1, 30, 100, 200])
def test_every_caller_gets_the_factors_it_had(total, warmup):
    for step in range(0, total + 3):
        assert warmup_cosine(step, warmup, total, angle_from_fraction=True) == _trainer(step, warmup, total)
        assert warmup_cosine(step, warmup, total, cosine=False) == _trainer(step, warmup, total, constant=True)
        assert warmup_cosine(step, warmup, total, floor=0.02) == _native(step, warmup, total)
        if warmup:
            assert warmup_cosine(step, warmup, total) == _backbone(step, warmup, total)


def test_shape_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0)))
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(500, 10, 100, floor=0.02) == pytest.approx(0.02)
    assert warmup_cosine(50, 0, 100, cosine=False) == 1.0
