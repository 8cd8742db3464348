"""Model families. Each adapter file says what differs for its family; this table picks one by config."""

from __future__ import annotations

from ..errors import ModelLoadError


def adapter_for_config(config):
    """(adapter class, transformers model class) for a checkpoint's config."""
    from transformers import (Gemma3ForConditionalGeneration, InternVLForConditionalGeneration,
                              LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration,
                              Qwen3VLMoeForConditionalGeneration)

    from .gemma3 import Gemma3Adapter
    from .internvl import InternVLAdapter
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter
    from .llava_onevision import LlavaOnevisionAdapter
    from .qwen2_5_vl import Qwen2_5VLAdapter
    from .qwen2_vl import Qwen2VLAdapter
    from .qwen3_vl import Qwen3VLAdapter

    table = {
        "llava_onevision": (LlavaOnevisionAdapter, LlavaOnevisionForConditionalGeneration),
        "llava": (LlavaAdapter, LlavaForConditionalGeneration),
        "llava_next": (LlavaNextAdapter, LlavaNextForConditionalGeneration),
        "qwen2_vl": (Qwen2VLAdapter, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5VLAdapter, Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (Qwen3VLAdapter, Qwen3VLForConditionalGeneration),
        "qwen3_vl_moe": (Qwen3VLAdapter, Qwen3VLMoeForConditionalGeneration),
        "internvl": (InternVLAdapter, InternVLForConditionalGeneration),
        "gemma3": (Gemma3Adapter, Gemma3ForConditionalGeneration),
    }
    if config.model_type not in table:
        raise ModelLoadError(f"model type {config.model_type!r} is not supported; supported: {sorted(table)}")
    return table[config.model_type]
