"""Shared pieces of the layer tests (neurons, discovery, fused weights, timm types): hand-built neurons, a registry.

Usable from any test module as ``from tests.helpers_layers import ...``; the :func:`scratch_registry` fixture is
imported by name into the test modules that use it.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lightning_comhe import _extractors, _timm_extractors
from lightning_comhe.neurons import extract_neuron_sets

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def scratch_registry():
    """Undo the registrations of a test (timm's types are registered first, so that restoring keeps them)."""
    assert _timm_extractors.register_timm_extractors()
    saved = dict(_extractors.REGISTRY)
    yield _extractors.REGISTRY
    _extractors.REGISTRY.clear()
    _extractors.REGISTRY.update(saved)


def flat_rows(weight):
    """Hand-built neurons of a weight whose dim 0 is the output axis: one flattened row per output unit."""
    return torch.stack([weight[i].flatten() for i in range(weight.shape[0])])


def conv_expected(weight, groups):
    """Hand-built (G, out/G, in/G * prod(k)) for a conv weight [out, in/G, *k]."""
    per = weight.shape[0] // groups
    return torch.stack([torch.stack([weight[g * per + j].flatten() for j in range(per)]) for g in range(groups)])


def single_set(module, **kw):
    """The one neuron set of a module (asserting that there is exactly one)."""
    sets = extract_neuron_sets(module, **kw)
    assert len(sets) == 1
    return sets[0]


def assert_fresh_python_prints_ok(code):
    """Run ``code`` in a fresh interpreter with the repository on ``PYTHONPATH``; it must succeed and print ``ok``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
