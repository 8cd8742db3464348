"""The architectures bench/engine_prefill.py measures: real configs (random weights), each with its own vision
tower run on random frames (LLaVA-OneVision's SigLIP, Qwen3-VL's tower with DeepStack, InternVL's tiles, Gemma 3's
896-px SigLIP)."""

from __future__ import annotations

import torch

from aim_engine.flops import vit_flops

ARCHS = {
    "ov-0.5b": dict(family="llava_onevision",
                    text=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2)),
    "ov-7b": dict(family="llava_onevision",
                  text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4)),
    # Qwen/Qwen3-VL-2B-Instruct and -8B-Instruct's config.json
    "qwen3-vl-2b": dict(family="qwen3_vl",
                        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=128),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                    out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-8b": dict(family="qwen3_vl",
                        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128),
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                    out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24])),
    # OpenGVLab/InternVL3-2B-hf: InternViT-300M + Qwen2.5-1.5B
    "internvl3-2b": dict(family="internvl",
                         text=dict(vocab_size=151674, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2),
                         vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14])),
    # google/gemma-3-4b-it: SigLIP-so400m at 896 px + Gemma 3 (every sixth layer global, the rest over 1024)
    "gemma3-4b": dict(family="gemma3",
                      text=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                                query_pre_attn_scalar=256),
                      vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, image_size=896, patch_size=14)),
}
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
              image_size=384, patch_size=14)
QWEN3_VIT = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)
QWEN3_SIDE = 448  # frame side: 28 x 28 patches, 196 tokens per temporal patch after the 2 x 2 merger


def text_config(arch: str):
    if ARCHS[arch]["family"] == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**ARCHS[arch]["text"], max_position_embeddings=131072, tie_word_embeddings=False)
    if ARCHS[arch]["family"] == "qwen3_vl":
        from transformers import Qwen3VLTextConfig

        return Qwen3VLTextConfig(**ARCHS[arch]["text"], max_position_embeddings=262144,
                                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                  "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    from transformers import Qwen2Config

    return Qwen2Config(**ARCHS[arch]["text"], max_position_embeddings=32768, tie_word_embeddings=False)


def _vision_qwen3_vl(args, dtype):
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    vc = Qwen3VLVisionConfig(**ARCHS[args.arch]["vision"], **QWEN3_VIT)
    with torch.device(args.device):
        tower = Qwen3VLVisionModel(vc).to(dtype).eval()
    side = QWEN3_SIDE // vc.patch_size
    views = args.frames // vc.temporal_patch_size
    grid = torch.tensor([[views, side, side]], device=args.device)
    pixels = torch.randn(int(grid.prod()), 3 * vc.temporal_patch_size * vc.patch_size ** 2, device=args.device,
                         dtype=dtype)

    def run():
        out = tower(pixels, grid_thw=grid, return_dict=True)
        return out.pooler_output, torch.stack(out.deepstack_features), views

    return run, vit_flops(vc.hidden_size, vc.intermediate_size, vc.depth, side * side, views)


def _vision_internvl(args, dtype):
    """A frame is one 448-px tile: InternViT, pixel shuffle, projector (the model's own get_image_features)."""
    from transformers import InternVLConfig, InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLModel

    arch = ARCHS[args.arch]
    config = InternVLConfig(vision_config=InternVLVisionConfig(**arch["vision"]), text_config=text_config(args.arch))
    config.text_config.num_hidden_layers = 1  # the tower and projector are what run here
    with torch.device(args.device):
        model = InternVLModel(config).to(dtype).eval()
    side = arch["vision"]["image_size"][0]
    tiles = torch.randn(args.frames, 3, side, side, device=args.device, dtype=dtype)

    def run():
        return model.get_image_features(tiles, return_dict=True).pooler_output.flatten(0, 1), None, args.frames

    patches = (side // arch["vision"]["patch_size"][0]) ** 2 + 1
    return run, vit_flops(arch["vision"]["hidden_size"], arch["vision"]["intermediate_size"],
                          arch["vision"]["num_hidden_layers"], patches, args.frames)


def _vision_gemma3(args, dtype):
    """Gemma 3 takes images, not video: `--frames` images of 896 px, 256 tokens each."""
    from transformers import Gemma3Config, SiglipVisionConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    vc = SiglipVisionConfig(**ARCHS[args.arch]["vision"])
    config = Gemma3Config(vision_config=vc, text_config=text_config(args.arch))
    with torch.device(args.device):
        tower = SiglipVisionModel(vc).to(dtype).eval()
        projector = Gemma3MultiModalProjector(config).to(dtype).eval()
    images = torch.randn(args.frames, 3, vc.image_size, vc.image_size, device=args.device, dtype=dtype)

    def run():
        return projector(tower(images).last_hidden_state).flatten(0, 1), None, args.frames

    return run, vit_flops(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers,
                          (vc.image_size // vc.patch_size) ** 2, args.frames)


def _vision_llava_onevision(args, dtype):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    config = LlavaOnevisionConfig(text_config=text_config(args.arch), vision_config=SiglipVisionConfig(**SIGLIP),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.device(args.device):
        model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    frames = torch.randn(1, args.frames, 3, 384, 384, device=args.device, dtype=dtype)

    def run():  # every frame's pooled tokens, then one newline token in no group
        return model.model.get_video_features(frames, return_dict=True).pooler_output[0], None, args.frames

    return run, vit_flops(SIGLIP["hidden_size"], SIGLIP["intermediate_size"], SIGLIP["num_hidden_layers"], 729,
                          args.frames)


VISION = {"llava_onevision": _vision_llava_onevision, "qwen3_vl": _vision_qwen3_vl, "internvl": _vision_internvl,
          "gemma3": _vision_gemma3}
