"""benchmarks/layer_bound.py: the FLOPs it divides by are the ones its products perform."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.layer_bound import head_step, layer_step


@pytest.mark.parametrize("fused", [False, True])
def test_layer_flops_are_what_torch_counts(fused):
    step, flops = layer_step(m=13, d=24, kv=8, ff=40, r=4, fused=fused)
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == flops


def test_head_flops_are_what_torch_counts():
    step, flops = head_step(t=7, d=24, vocab=100)
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == flops
