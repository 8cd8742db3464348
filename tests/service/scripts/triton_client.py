"""Runs in its own process (tritonclient's `inference` protos clash with ours in one descriptor pool): talks to
an aim-serve server with the real `tritonclient[grpc]` and prints one JSON object of what it saw."""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

target, model, image_path, video_path = sys.argv[1:5]
out = {}
client = triton.InferenceServerClient(target)
out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready()
out["model_ready"] = client.is_model_ready(model)
out["unknown_model_ready"] = client.is_model_ready("nope")
meta = client.get_server_metadata()
out["server"] = {"name": meta.name, "extensions": list(meta.extensions)}
model_meta = client.get_model_metadata(model)
out["inputs"] = [i.name for i in model_meta.inputs]
out["outputs"] = [o.name for o in model_meta.outputs]


def tensors(prompt, image=None, video=None):
    items = [("text_input", [prompt.encode()])]
    if image:
        items.append(("image", [open(image, "rb").read()]))
    if video:
        items.append(("video", [open(video, "rb").read()]))
    result = []
    for name, values in items:
        t = triton.InferInput(name, [len(values)], "BYTES")
        t.set_data_from_numpy(np.array(values, dtype=np.object_))
        result.append(t)
    return result


params = {"aim_max_new_tokens": 6, "aim_reduction": "plan", "aim_merge_retention": 0.25, "aim_prune_start": 2,
          "aim_prune_end": 5, "aim_num_frames": 4, "aim_positions": "original",
          "aim_proportional_attention": True}
res = client.infer(model, tensors("What moves?", video=video_path), parameters=params)
out["infer_text"] = res.as_numpy("text_output")[0].decode("utf-8", "replace")
p = res.get_response().parameters
out["infer_params"] = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in p.items()}

res = client.infer(model, tensors("Describe.", image=image_path), parameters={"aim_max_new_tokens": 4,
                                                                               "aim_reduction": "none"})
out["image_plan"] = res.get_response().parameters["aim_plan"].string_param

try:
    client.infer(model, tensors("Hi"), parameters={"aim_reduction": "plan", "aim_merge_retention": 3.0})
except InferenceServerException as exc:
    out["bad_plan_error"] = {"status": exc.status(), "message": exc.message()}

# streaming: one response per delta, then a final one flagged triton_final_response
responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
client.async_stream_infer(model, tensors("Tell me.", video=video_path), enable_empty_final_response=True,
                          parameters={"aim_max_new_tokens": 8, "aim_reduction": "none", "aim_num_frames": 4})
deltas, final = [], None
while final is None:
    result, error = responses.get(timeout=60)
    if error is not None:
        out["stream_error"] = str(error)
        break
    r = result.get_response()
    if r.parameters["triton_final_response"].bool_param:
        final = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in r.parameters.items()}
    else:
        deltas.append(result.as_numpy("text_output")[0].decode("utf-8", "replace"))
client.async_stream_infer("nope", tensors("Hi"), enable_empty_final_response=True)
result, error = responses.get(timeout=60)
out["stream_unknown_model_error"] = str(error)
client.stop_stream()
out["stream_deltas"] = deltas
out["stream_final"] = final
print(json.dumps(out))
