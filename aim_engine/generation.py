"""Token choice and stop conditions for the decode loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """A generation parameter is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens >= 1; temperature 0 = greedy, else > 0; top_p in (0, 1]; seed makes sampling
    reproducible; stop strings end the answer (not included in it)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.temperature != self.temperature:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")


class TokenSampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, sorted_idx = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.params.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, sorted_idx, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class IncrementalText:
    """Turns a growing list of token ids into text deltas. Holds back text that could still become a stop
    string or an incomplete UTF-8 sequence, and finds the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        if safe <= self.emitted:
            return ""
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
