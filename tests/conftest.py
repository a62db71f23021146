"""Fixtures of the tests that run the real Gemma 3 270M (the demo model, ``tg.load_demo()``).

A test module that needs another ``model`` (a tiny random one) defines its own fixture of
that name, which pytest prefers to this one.
"""

from pathlib import Path

import numpy as np
import pytest

import tinygemma as tg

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref():
    """transformers' numbers for the demo model (``fixtures/demo_ref.npz``, make_fixtures.py)."""
    with np.load(FIXTURES / "demo_ref.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module", params=["reference", "fast"])
def model(request):
    """The demo model on each path: the NumPy reference, then the fast path."""
    return tg.load_demo(fast=request.param == "fast")


@pytest.fixture(scope="module")
def demo_path():
    """The demo's .gguf file."""
    return tg.loader.demo_path()


@pytest.fixture(scope="module")
def demo():
    """The demo model on the fast path (the default)."""
    return tg.load_demo()


@pytest.fixture(scope="module")
def demo_reference():
    """The demo model on the NumPy reference path."""
    return tg.load_demo(fast=False)
