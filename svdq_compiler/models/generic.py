"""The generic path: any nn.Module, with example inputs (and, optionally, dynamic shapes) that the user gives."""

from __future__ import annotations

from svdq_compiler.errors import InputError
from svdq_compiler.models.base import ModelAdapter


class GenericAdapter(ModelAdapter):
    """Matches any module. It knows nothing about the model, so inputs must come from the user."""

    name = "generic"
    class_names = ()
    # a module of no known family is captured as its caller declares: every dimension static unless named
    automatic_dims_for_own_inputs = False

    def matches(self, model):
        return True

    def example_inputs(self, model, batch=1, tokens=None, seed=0, text_tokens=None):
        raise InputError(f"no model adapter knows how to build inputs for {type(model).__name__}",
                         fix="call svdq_compiler.compile(model, example_inputs, dynamic_shapes=...) with your own "
                             "inputs (diffusers models get theirs from the auto adapter)")

    def dynamic_shapes(self, model, inputs):
        return None  # only the user knows which dimensions of their inputs vary

    def sizes_of(self, model, inputs):
        return None  # nor which of them are the batch, the text or the image grid

    def calib_inputs(self, model, num_prompts, num_steps, seed=0, *, batch=1, tokens=None):
        raise InputError(f"no model adapter knows how to build calibration inputs for {type(model).__name__}",
                         fix="pass calib_inputs=[...] (a list of example-input tuples or dicts) to compile")
