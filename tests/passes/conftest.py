"""Fixtures for the pass tests; the tiny networks live in tiny_models.py."""

import pytest
from tiny_models import captured, dit_inputs, tiny_dit


@pytest.fixture
def dit():
    model = tiny_dit()
    inputs = dit_inputs()
    return model, inputs, captured(model, inputs)
