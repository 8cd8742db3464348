"""AIM on Hugging Face transformers VLMs: visual token merging before the LLM and progressive pruning
inside it, with pruned tokens physically removed. Knows nothing of gRPC, Prometheus or NVML.

The names below load on first use, so `aim_engine.plan` or `aim_engine.media` can be imported (by a gRPC
client) without loading torch and transformers."""

import importlib

_EXPORTS = {
    "AimEngine": "engine", "GenerationRequest": "request", "GenerationResult": "request", "ImagePart": "request",
    "RequestStats": "request", "TextPart": "request", "TokenDelta": "request", "VideoPart": "request",
    "EngineError": "errors", "GenerationError": "errors", "MediaError": "errors", "ModelLoadError": "errors",
    "PlanError": "errors", "RequestError": "errors", "SamplingParams": "generation", "MediaLimits": "media",
    "ReductionPlan": "plan", "StageRates": "serving.slices", "StepBudget": "serving.slices",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aim_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
