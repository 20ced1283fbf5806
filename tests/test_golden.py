"""The tiny ISA-DiT stack reproduces the outputs recorded before the top-floor redesign (tests/assets/golden).

Tolerance 0: the recording and this test run the same float32 operations in the same order on the CPU in one
thread (so no BLAS split changes a sum), and a refactor that keeps the behaviour keeps every bit. A change of
PyTorch version may move the last bits; then re-record with the script, on the commit before the change under test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import import_script

GOLDEN = Path(__file__).resolve().parent / "assets/golden"


def test_tiny_dit_forward_training_loss_and_samples_equal_the_recorded_ones():
    expected = torch.load(GOLDEN / "dit_golden.pt")
    threads = torch.get_num_threads()
    try:
        got = import_script(GOLDEN, "make_dit_golden").record()
    finally:
        torch.set_num_threads(threads)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name], value), f"{name}: max |diff| {(got[name] - value).abs().max().item():.3g}"
