"""Token choice and stop conditions for the decode loop."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from .errors import GenerationError

# Stop strings are checked on the engine's thread at every token, against the text the token could complete: at
# most MAX_STOP_STRINGS x (MAX_STOP_CHARS + the token's text) characters, whatever a request sends.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens >= 1; temperature 0 = greedy, else > 0; top_p in (0, 1]; seed makes sampling
    reproducible; stop strings end the answer (not included in it): at most MAX_STOP_STRINGS, none empty or longer
    than MAX_STOP_CHARS."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks), as vLLM's ignore_eos

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (0 <= self.temperature < math.inf):
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise GenerationError(f"{len(self.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise GenerationError(f"a stop string of {longest} characters; the limit is {MAX_STOP_CHARS}")


def sequence_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A sequence's own random stream (None when greedy): its draws do not depend on what else is batched."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    # an unseeded request draws its seed from the OS, never by reseeding torch's global generator (torch.seed())
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


@torch.inference_mode()
def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of logits (B, V), each row with its own parameters, in one batched pass on the device.

    Greedy rows take the argmax. Sampled rows divide by their temperature, keep the smallest prefix of tokens
    (by probability) whose mass reaches top_p (always at least one), and draw by the exponential race:
    argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p, and each row's E comes from its own generator,
    so a seeded sequence draws the same tokens alone or in any batch. Returns (B,) int64 on the device."""
    greedy = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return greedy
    rows = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
    probs = torch.softmax(logits[rows].float() / temps[:, None], dim=-1)
    if bool((top_p < 1.0).any()):  # host values: no device sync
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    race = torch.stack([torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=generators[i])
                        for i in sampled])
    choice = torch.argmax(probs / race, dim=-1)
    return greedy.index_copy(0, rows, choice)


class IncrementalText:
    """Turns a growing list of token ids into text deltas without re-decoding the whole answer: each step decodes
    only the tokens since the last emitted boundary (plus a few before it, so a tokenizer that joins pieces with
    context-dependent spaces decodes them as in the full text). Holds back text that could still become a stop
    string or an incomplete UTF-8 sequence, and finds the first stop string."""

    CONTEXT_TOKENS = 4  # tokens decoded before the new ones, whose text is subtracted again

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # final text so far (after a stop string: up to it)
        self._decoded_upto = 0  # ids[:_decoded_upto] are in self.text
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        start = max(0, self._decoded_upto - self.CONTEXT_TOKENS)
        before = self.tokenizer.decode(self.ids[start:self._decoded_upto], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
        if window.endswith("\ufffd") or not window.startswith(before):
            return ""  # an incomplete character: wait for the next token
        new = window[len(before):]
        searched_from = max(0, len(self.text) - self.hold)
        self.text += new
        self._decoded_upto = len(self.ids)
        for s in self.stop:
            at = self.text.find(s, searched_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self.hold
        if safe <= self.emitted:
            return ""
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        if not self.stopped and self._decoded_upto < len(self.ids):  # a trailing incomplete character
            start = max(0, self._decoded_upto - self.CONTEXT_TOKENS)
            before = self.tokenizer.decode(self.ids[start:self._decoded_upto], skip_special_tokens=True)
            window = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
            self.text += window[len(before):] if window.startswith(before) else ""
            self._decoded_upto = len(self.ids)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
