"""Tiny randomly initialised checkpoints of each supported family, built from configs (never downloaded):
for tests, for the quickstart demo until a trained model exists, and for timing benchmarks.

Each is saved as a normal checkpoint directory (config, weights, tokenizer, image processor, chat template)
and loaded by the engine like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"]

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}{IMAGE}{% elif c.type == 'video' %}{VIDEO}"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(image: str, video: str) -> str:
    return _CHATML.replace("{IMAGE}", image).replace("{VIDEO}", video)


def build_tokenizer(extra: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with no merges (one token per byte) plus the special tokens (and `extra` ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + list(extra)})
    return tokenizer


def _qwen2_text_config(tokenizer, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def build_llava_onevision(path: str | Path, layers: int = 4, hidden: int = 64, image_size: int = 32,
                          patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision: SigLIP 4x4 patches per 32-px view, Qwen2 LM with `layers` layers."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    path = Path(path)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("<image>", "<video>")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size)
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
                 [2 * image_size, 2 * image_size]]
    config = LlavaOnevisionConfig(
        text_config=_qwen2_text_config(tokenizer, layers, hidden, 4, 2, 2 * hidden),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    _save_random_model(LlavaOnevisionForConditionalGeneration, config, tokenizer, path, seed)
    LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)
    return path


def _save_random_model(model_cls, config, tokenizer, path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _scale_up_init(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _scale_up_init(model) -> None:
    """Random init with std 0.02 makes every token look alike; a wider init gives tiny models distinct
    tokens and attention patterns, so tests of merging/pruning are not trivially satisfied."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" in name or "image_newline" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)


def _llama_and_clip_configs(tokenizer, layers: int, hidden: int, image_size: int, patch_size: int):
    """The LLaVA-1.5 / LLaVA-NeXT pair: a Llama LM and a CLIP vision tower."""
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    return text, vision


def build_llava(path: str | Path, layers: int = 4, hidden: int = 64, image_size: int = 32, patch_size: int = 8,
                seed: int = 0) -> Path:
    """A tiny LLaVA-1.5: CLIP vision tower (CLS dropped), MLP projector, Llama LM."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("<image>", "<video>")
    text, vision = _llama_and_clip_configs(tokenizer, layers, hidden, image_size, patch_size)
    config = LlavaConfig(text_config=text, vision_config=vision,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    _save_random_model(LlavaForConditionalGeneration, config, tokenizer, path, seed)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return path


def build_llava_dinov2(path: str | Path, layers: int = 4, hidden: int = 64, image_size: int = 32,
                       patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny model shaped like the reference VLM: DINOv2 vision tower read at two layers (concatenated), LLaVA
    projector, Llama LM, and a <video> placeholder taking frames of 3/4 the image size."""
    from transformers import BitImageProcessorPil, Dinov2Config, LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("<image>", "<video>")
    text, _ = _llama_and_clip_configs(tokenizer, layers, hidden, image_size, patch_size)
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=image_size, patch_size=patch_size)
    config = LlavaConfig(text_config=text, vision_config=vision,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=[1, 2], vision_feature_select_strategy="default")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    config.video_frame_size = image_size * 3 // 4
    _save_random_model(LlavaForConditionalGeneration, config, tokenizer, path, seed)
    BitImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return path


def build_llava_next(path: str | Path, layers: int = 4, hidden: int = 64, image_size: int = 32,
                     patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny LLaVA-NeXT: CLIP vision tower (CLS dropped), anyres crops with row newlines, Llama LM."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("<image>", "<video>")
    text, vision = _llama_and_clip_configs(tokenizer, layers, hidden, image_size, patch_size)
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    config = LlavaNextConfig(text_config=text, vision_config=vision, image_grid_pinpoints=pinpoints,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    _save_random_model(LlavaNextForConditionalGeneration, config, tokenizer, path, seed)
    LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return path


def _qwen_vl_tokenizer(hidden: int):
    """The Qwen-VL families' tokenizer and chat template, their head width (4 heads) and M-RoPE section (the
    head_dim / 2 rotary frequencies shared out among t, h and w)."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                                            "<|vision_start|><|video_pad|><|vision_end|>")
    head_dim = hidden // 4
    half = head_dim // 2
    return tokenizer, head_dim, [half - 2 * (half // 4), half // 4, half // 4]


def _save_qwen_vl(config_cls, model_cls, text: dict, vision: dict, tokenizer, path: Path, seed: int, patch_size: int,
                  max_pixels: int) -> Path:
    """The Qwen-VL families' checkpoint: their special tokens, and the shared image processor (2x2 merge, temporal
    patch 2)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    _save_random_model(model_cls, config, tokenizer, path, seed)
    Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 8 * 8, "longest_edge": max_pixels},
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return path


def build_qwen2_vl(path: str | Path, layers: int = 4, hidden: int = 64, patch_size: int = 4, seed: int = 0,
                   max_pixels: int = 32 * 32, version: str = "2") -> Path:
    """A tiny Qwen2-VL (version "2") or Qwen2.5-VL ("2.5"): ViT (patch 4, 2x2 merger, temporal patch 2) +
    Qwen2 LM with M-RoPE."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    path = Path(path)
    tokenizer, head_dim, section = _qwen_vl_tokenizer(hidden)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    common = dict(patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, **common)
    else:
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, num_heads=2,
                      window_size=4 * patch_size * 2, fullatt_block_indexes=[1], tokens_per_second=4, **common)
    return _save_qwen_vl(config_cls, model_cls, text, vision, tokenizer, path, seed, patch_size, max_pixels)


def build_qwen2_5_vl(path: str | Path, **kwargs) -> Path:
    return build_qwen2_vl(path, version="2.5", **kwargs)


def build_qwen3_vl(path: str | Path, layers: int = 4, hidden: int = 64, patch_size: int = 4, seed: int = 0,
                   max_pixels: int = 32 * 32, experts: int = 0) -> Path:
    """A tiny Qwen3-VL: ViT (patch 4, 2x2 merger, temporal patch 2, learned position grid) whose blocks 0 and 1
    also feed DeepStack mergers, + a Qwen3 LM (qk-norm, explicit head_dim, interleaved M-RoPE). `experts` > 0:
    the MoE text model (Qwen3-VL-MoE), `experts` experts with 2 active per token in every layer."""
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)

    path = Path(path)
    tokenizer, head_dim, section = _qwen_vl_tokenizer(hidden)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, head_dim=head_dim,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    if experts:
        text.update(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if experts
                             else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    return _save_qwen_vl(config_cls, model_cls, text, vision, tokenizer, path, seed, patch_size, max_pixels)


def build_qwen3_vl_moe(path: str | Path, **kwargs) -> Path:
    return build_qwen3_vl(path, experts=4, **kwargs)


def build_internvl(path: str | Path, layers: int = 4, hidden: int = 64, image_size: int = 32, patch_size: int = 4,
                   seed: int = 0, lm: str = "qwen2") -> Path:
    """A tiny InternVL: InternViT (8 x 8 patches per 32-px tile, CLS dropped), pixel shuffle to 4 x 4 = 16 tokens per
    tile, MLP projector, and a Qwen2 LM (InternVL3's shape) or with `lm="qwen3"` a Qwen3 one (InternVL3.5's); an
    image is cut into up to 4 tiles plus a thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen3Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(extra=("<img>", "</img>", "<IMG_CONTEXT>"))
    tokenizer.chat_template = chat_template("<IMG_CONTEXT>\n", "<video>\n")
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[image_size, image_size], patch_size=[patch_size, patch_size])
    tokens = (image_size // patch_size // 2) ** 2
    text = _qwen2_text_config(tokenizer, layers, hidden, 4, 2, 2 * hidden)
    if lm == "qwen3":  # qk-norm and an explicit head_dim
        text = Qwen3Config(**{k: v for k, v in text.to_dict().items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
            head_dim=hidden // 4)
    config = InternVLConfig(text_config=text,
                            vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=tokens, tie_word_embeddings=False)
    _save_random_model(InternVLForConditionalGeneration, config, tokenizer, path, seed)
    GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1,
                             max_patches=4, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return path


def build_gemma3(path: str | Path, layers: int = 6, hidden: int = 64, image_size: int = 32, patch_size: int = 4,
                 sliding_window: int = 8, seed: int = 0) -> Path:
    """A tiny Gemma 3: SigLIP (8 x 8 patches per 32-px image) average-pooled to 4 x 4 = 16 tokens per image, Gemma 3
    LM whose layers are sliding-window (window `sliding_window`, small enough to bind inside an image) except every
    sixth, with image tokens attending to each other both ways."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(extra=("<start_of_image>", "<end_of_image>", "<image_soft_token>"))
    tokenizer.chat_template = chat_template("<start_of_image>", "<video>")
    head_dim = hidden // 4
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                            query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
                            max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=(image_size // patch_size) ** 2 // 4,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False)
    _save_random_model(Gemma3ForConditionalGeneration, config, tokenizer, path, seed)
    Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5],
                            image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return path


BUILDERS = {"llava_onevision": build_llava_onevision, "llava": build_llava, "llava_dinov2": build_llava_dinov2,
            "llava_next": build_llava_next,
            "qwen2_vl": build_qwen2_vl,
            "qwen2_5_vl": build_qwen2_5_vl,
            "qwen3_vl": build_qwen3_vl, "qwen3_vl_moe": build_qwen3_vl_moe,
            "internvl": build_internvl, "internvl_qwen3": lambda path, **kw: build_internvl(path, lm="qwen3", **kw),
            "gemma3": build_gemma3}
