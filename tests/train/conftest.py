"""Fixtures of the training tests."""
from __future__ import annotations

import pytest

from tests.training_data import write_phantom_lits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five liver phantoms (64x64x12) in the LiTS layout, made once per test module."""
    return write_phantom_lits(tmp_path_factory.mktemp("phantoms"), n=5, shape=(64, 64, 12))
