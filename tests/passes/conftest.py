"""Fixtures for the pass tests; the tiny networks live in tiny_models.py."""

import pytest
from tiny_models import dit_inputs, tiny_dit

import svdq_compiler


@pytest.fixture
def dit():
    model = tiny_dit()
    inputs = dit_inputs()
    return model, inputs, svdq_compiler.capture(model, inputs)
