"""Shared fixtures: tiny RefNet model files for the core and adapter tests."""

from __future__ import annotations

import pytest
import torch
from refnet.checkpoint import load_model, save_model
from refnet.model import RefNet, RefNetConfig

TINY_FEATURES = (4, 4, 8, 8, 16, 4)
TEST_MODEL_GUARDS = {"max_volume_change": 1e6}  # what the test model files record (see make_model_file)

# Tiny nets gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot to them.
torch.set_num_threads(1)


def make_model_file(path, *, perturb: bool = True, ct_channels: int = 0, metadata=None):
    """A tiny RefNet saved to ``path``; ``perturb`` makes it grow the liver (an untrained one is identity)."""
    torch.manual_seed(0)
    net = RefNet(RefNetConfig(features=TINY_FEATURES, ct_channels=ct_channels))
    if perturb:
        # A net that grows the liver (class 6) into its surroundings, plus a little noise: guards then
        # have real work (growth beyond the band, islands far from the liver) and results stay deterministic.
        torch.nn.init.normal_(net.unet.final_conv.weight, std=2.0)
        with torch.no_grad():
            net.unet.final_conv.bias[6] = 5.0
    # The test net grows the liver far beyond half its volume, which the volume guard would undo whole; the
    # other guards' tests need its changes, so its file allows any volume change (test_guards tests that guard).
    metadata = dict(metadata or {})
    metadata["guards"] = {**TEST_MODEL_GUARDS, **(metadata.get("guards") or {})}
    save_model(path, net, metadata=metadata)
    return path


@pytest.fixture
def tiny_model(tmp_path):
    return load_model(make_model_file(tmp_path / "tiny.pt"))


@pytest.fixture
def identity_model(tmp_path):
    return load_model(make_model_file(tmp_path / "identity.pt", perturb=False))
