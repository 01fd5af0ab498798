"""Errors that reach the user. Each one names what went wrong, where, and what to do about it."""

from __future__ import annotations


class SvdqError(Exception):
    """Base class: one clear line built from what went wrong, where, and the fix."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"(at {where})")
        message = " ".join(parts)
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class InputError(SvdqError):
    """A path, model name, option or argument the user gave cannot be used."""


class ShapeError(InputError):
    """An input's shape is one the captured graph cannot serve (a static dimension, or outside a range)."""


class CaptureError(SvdqError):
    """The model could not be captured with torch.export as asked."""


class CalibrationError(SvdqError):
    """Calibration inputs or the activations they produce are unusable (wrong signature, NaN/Inf)."""


class QuantizationError(SvdqError):
    """A tensor cannot be quantized as asked (non-finite values, wrong dtype, bad shape)."""


class CheckpointError(SvdqError):
    """A saved graph, checkpoint or LoRA file is missing, corrupt, or from an incompatible version."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
