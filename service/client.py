"""A small Python client for aim.v1.AimService.

    with AimClient("127.0.0.1:50051") as client:
        reply = client.generate("What happens?", videos=["clip.mp4"], slo_ms=2000)
        for delta in client.stream("Describe it.", images=["a.png"], plan=ReductionPlan(merge_retention=0.25)):
            print(delta, end="")
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Iterator, Sequence

import grpc

from aim_engine.mime import sniff_mime_type
from aim_engine.plan import ReductionPlan

from .plan_proto import plan_to_proto
from .proto.aim.v1 import aim_service_pb2 as pb
from .proto.aim.v1 import aim_service_pb2_grpc as pb_grpc

Media = str | Path | bytes
_PRIORITY = {None: pb.PRIORITY_UNSPECIFIED, "low": pb.PRIORITY_LOW, "normal": pb.PRIORITY_NORMAL,
             "high": pb.PRIORITY_HIGH}


def _load(item: Media) -> tuple[bytes, str]:
    if isinstance(item, bytes):
        return item, sniff_mime_type(item)
    data = Path(item).read_bytes()
    return data, sniff_mime_type(data) or mimetypes.guess_type(str(item))[0] or ""


class AimClient:
    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.AimServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    # ---- building requests --------------------------------------------------------------------
    @staticmethod
    def build_request(prompt: str, images: Sequence[Media] = (), videos: Sequence[Media] = (),
                      frames: int = 0, max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0,
                      seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                      plan: ReductionPlan | None = None,
                      no_reduction: bool = False, slo_ms: int = 0, min_retention: float = 0.0,
                      priority: str | None = None, model: str = "", system_prompt: str = "",
                      message=pb.GenerateRequest):
        """`plan` is sent exactly; else `no_reduction`; else auto with `slo_ms`, `min_retention` and `priority`
        ("low" | "normal" | "high"; None = the server's default, normal)."""
        if priority not in _PRIORITY:
            raise ValueError(f"priority must be low, normal or high, got {priority!r}")
        parts = []
        for item in images:
            data, mime = _load(item)
            parts.append(pb.ContentPart(image=pb.Image(data=data, mime_type=mime)))
        for item in videos:
            data, mime = _load(item)
            parts.append(pb.ContentPart(video=pb.Video(data=data, mime_type=mime, num_frames=frames)))
        parts.append(pb.ContentPart(text=prompt))
        if no_reduction:
            reduction = pb.Reduction(none=pb.NoReduction())
        elif plan is not None:
            reduction = pb.Reduction(plan=plan_to_proto(plan))
        else:
            reduction = pb.Reduction(auto=pb.AutoBudget(latency_slo_ms=slo_ms, min_retention=min_retention,
                                                        priority=_PRIORITY[priority]))
        sampling = pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     stop=list(stop), ignore_eos=ignore_eos)
        if seed is not None:
            sampling.seed = seed
        return message(model=model, parts=parts, sampling=sampling, reduction=reduction, system_prompt=system_prompt)

    # ---- calls --------------------------------------------------------------------------------
    def generate(self, prompt: str, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(self.build_request(prompt, **kwargs), timeout=self.timeout, metadata=self.metadata)

    def stream_events(self, prompt: str, **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        request = self.build_request(prompt, message=pb.GenerateStreamRequest, **kwargs)
        return self.stub.GenerateStream(request, timeout=self.timeout, metadata=self.metadata)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Text deltas; the final GenerateResponse is kept in `self.last_result`."""
        self.last_result = None
        for event in self.stream_events(prompt, **kwargs):
            if event.HasField("result"):
                self.last_result = event.result
            else:
                yield event.text_delta

    def estimate(self, prompt: str, **kwargs) -> pb.EstimateCostResponse:
        request = self.build_request(prompt, message=pb.EstimateCostRequest, **kwargs)
        return self.stub.EstimateCost(request, timeout=self.timeout, metadata=self.metadata)

    def model_info(self, model: str = "") -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=self.timeout,
                                      metadata=self.metadata)
