"""Typed errors a caller can act on. The engine never lets a library's exception escape for bad input."""

from __future__ import annotations

from .plan import PlanError


class GenerationError(ValueError):
    """A generation parameter is out of range."""


class EngineError(Exception):
    """Base for errors caused by the request (not by the engine)."""


class MediaError(EngineError):
    """Media that cannot be used. `reason` is one of the class constants below."""

    CORRUPT = "corrupt"
    UNSUPPORTED = "unsupported"
    TOO_LARGE = "too_large"
    TOO_MANY_FRAMES = "too_many_frames"
    EMPTY = "empty"

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RequestError(EngineError):
    """The request as a whole is malformed (empty prompt, media the model cannot take, ...)."""


class Cancelled(Exception):
    """Work stopped because the request's should_stop said so (client gone or deadline passed): media decoding,
    the vision tower or the prefill. Not an error of the request; whatever it held is released."""


class ModelLoadError(Exception):
    """A checkpoint directory cannot be loaded; the message says what is missing."""


__all__ = ["EngineError", "MediaError", "RequestError", "ModelLoadError", "Cancelled", "PlanError", "GenerationError"]
