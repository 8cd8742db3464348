"""Evaluation items: the synthetic test split, or a JSONL file of multiple-choice questions.

JSONL format (one object per line; the shape of VideoMME / MLVU / MVBench):

    {"id": "q1",                      # optional; defaults to the line number
     "video": "clips/a.mp4",          # or "image": "img.png", or "images": ["a.png", "b.png"]
     "question": "What is the man holding?",
     "options": ["A. a cup", "B. a phone", "C. a book", "D. a bag"],   # letters optional: added if absent
     "answer": "B",                   # the correct option's letter (or its full text)
     "type": "action",                # optional: accuracy is also reported per type
     "frames": 16}                    # optional: frames sampled uniformly from the video (default 8)

Paths are relative to the JSONL file. The prompt is the question, the lettered options, and "Answer with the
option's letter from the given choices directly."; the first standalone letter of the reply is scored.
"""

from __future__ import annotations

import json
import mimetypes
import re
from dataclasses import dataclass, field
from pathlib import Path

from aim_engine.generation import SamplingParams
from aim_engine.request import GenerationRequest, ImagePart, TextPart, VideoPart
from reference_model import synthetic as syn

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the line and the field."""


@dataclass
class EvalItem:
    uid: str
    qtype: str
    kind: str  # "image" | "video" | "text" (what the LLM sees besides text)
    parts: list
    answer: str
    multiple_choice: bool = False
    max_new_tokens: int = 4

    def request(self) -> GenerationRequest:
        return GenerationRequest(list(self.parts), SamplingParams(max_new_tokens=self.max_new_tokens))

    def is_correct(self, reply: str) -> bool:
        if self.multiple_choice:
            m = re.search(r"\b([A-J])\b", reply.strip())
            return bool(m) and m.group(1) == self.answer
        return syn.normalize_answer(reply) == syn.normalize_answer(self.answer)


@dataclass
class Dataset:
    name: str
    items: list[EvalItem] = field(default_factory=list)

    @property
    def types(self) -> list[str]:
        return list(dict.fromkeys(i.qtype for i in self.items))

    def for_family(self, supports_video: bool) -> "Dataset":
        """What a model can be asked: all of it, or for a family that takes no video (Gemma 3, LLaVA-1.5) its image
        and text questions, named so ("<name>-images")."""
        if supports_video or not any(i.kind == "video" for i in self.items):
            return self
        return Dataset(f"{self.name}-images", [i for i in self.items if i.kind != "video"])


def synthetic_dataset(per_type: int, seed: int = 0, split: str = "test") -> Dataset:
    items = []
    for ex, qa in syn.test_items(seed, per_type, split):
        media = ImagePart(image=ex.frames[0]) if ex.kind == "image" else VideoPart(frames=ex.frames)
        items.append(EvalItem(uid=f"{ex.uid}-{qa.qtype}", qtype=qa.qtype, kind=ex.kind,
                              parts=[media, TextPart(qa.question)], answer=qa.answer))
    return Dataset(f"synthetic-{split}", items)


def _mime(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def jsonl_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {n}: not JSON ({exc.msg})") from None
        for key in ("question", "options", "answer"):
            if key not in row:
                raise DatasetError(f"{path} line {n}: missing {key!r}")
        options = row["options"]
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise DatasetError(f"{path} line {n}: 'options' must be a list of 2..{len(LETTERS)} strings")
        lettered = [o if re.match(r"^[A-J][.)]\s", o) else f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
        answer = str(row["answer"]).strip()
        if answer not in LETTERS[: len(options)]:
            plain = [re.sub(r"^[A-J][.)]\s*", "", o) for o in lettered]
            if answer not in plain:
                raise DatasetError(f"{path} line {n}: answer {answer!r} is neither an option letter nor an option")
            answer = LETTERS[plain.index(answer)]
        parts, kind = [], "text"
        media = [row["image"]] if "image" in row else list(row.get("images", []))
        for m in media:
            file = path.parent / m
            if not file.is_file():
                raise DatasetError(f"{path} line {n}: image {m!r} not found")
            parts.append(ImagePart(data=file.read_bytes(), mime_type=_mime(file)))
            kind = "image"
        if "video" in row:
            file = path.parent / row["video"]
            if not file.is_file():
                raise DatasetError(f"{path} line {n}: video {row['video']!r} not found")
            parts.append(VideoPart(data=file.read_bytes(), mime_type=_mime(file), num_frames=int(row.get("frames", 8))))
            kind = "video"
        prompt = "\n".join([row["question"], *lettered, MC_INSTRUCTION])
        items.append(EvalItem(uid=str(row.get("id", n)), qtype=str(row.get("type", "all")), kind=kind,
                              parts=parts + [TextPart(prompt)], answer=answer, multiple_choice=True))
    if not items:
        raise DatasetError(f"{path}: no questions")
    return Dataset(path.stem, items)


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """'synthetic[-SPLIT][:N]' — N questions per type (default 100) of the seeded synthetic split SPLIT ('test',
    the default, or 'val' for calibration) — or a path to a .jsonl file."""
    name, _, count = spec.partition(":")
    if name == "synthetic" or name.startswith("synthetic-"):
        split = name.partition("-")[2] or "test"
        if split not in ("test", "val"):
            raise DatasetError(f"dataset {spec!r}: the synthetic splits to evaluate on are 'test' and 'val'")
        try:
            per_type = int(count) if count else 100
        except ValueError:
            raise DatasetError(f"dataset {spec!r}: N must be a whole number of questions per type") from None
        return synthetic_dataset(per_type, seed, split)
    return jsonl_dataset(spec)
