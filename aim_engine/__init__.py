"""AIM on Hugging Face transformers VLMs: visual token merging before the LLM and progressive pruning
inside it, with pruned tokens physically removed. Knows nothing of gRPC, Prometheus or NVML."""

from .engine import AimEngine
from .request import (GenerationRequest, GenerationResult, ImagePart, RequestStats, TextPart, TokenDelta,
                      VideoPart)
from .errors import EngineError, GenerationError, MediaError, ModelLoadError, PlanError, RequestError
from .generation import SamplingParams
from .media import MediaLimits
from .plan import ReductionPlan

__all__ = [
    "AimEngine", "GenerationRequest", "GenerationResult", "ImagePart", "RequestStats", "TextPart", "TokenDelta",
    "VideoPart", "EngineError", "GenerationError", "MediaError", "ModelLoadError", "PlanError", "RequestError",
    "SamplingParams", "MediaLimits", "ReductionPlan",
]
