"""Trains the reference VLM's projector and LoRA adapters on the synthetic dataset, on CPU, in resumable stages.

Only the projector (1 M parameters) and rank-16 LoRA adapters on every linear of the LLM (4.9 M) train; the
DINOv2 encoder and the LLM stay frozen. Each training sequence is one image or video followed by all of its
questions as a multi-turn chat (LLaVA's packing), so the visual tokens are paid for once per several
supervised answers; the loss is on the answer tokens (and their end-of-turn token) only. Stage A trains at
low resolution (112-px images, 4-frame videos: ~3x the throughput), stage B at the served resolution
(224-px images, 8-frame videos).

Reproducible from the seed: example k of step s is a pure function of (seed, s, k); a checkpoint after every
`save_every` steps holds everything needed to resume bit-for-bit (weights, optimiser, step).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import synthetic as syn
from .assemble import PRODUCT_DIR, save_product
from .lora import add_lora, load_lora_state, lora_state


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    image_size: int
    frames: int
    frame_size: int
    video_share: float  # fraction of batches that are videos
    restart_lr: float | None = None  # starts a new warm-up + cosine cycle peaking at this fraction of the LRs
    position_loss: float = 0.0  # weight of the projector's position-readout loss (see `position_readout_loss`)
    distractors: bool = True  # False: clips show the moving object alone (a curriculum for direction)


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr_projector: float = 1e-3
    lr_lora: float = 3e-4
    warmup_steps: int = 30
    min_lr_fraction: float = 0.1
    stages: list[Stage] = field(default_factory=lambda: [
        Stage("A", 450, image_size=112, frames=4, frame_size=112, video_share=0.3),
        Stage("B", 100, image_size=224, frames=8, frame_size=112, video_share=0.3),
        # A second cycle at the served sizes (a warm restart at half the peak), more of it on video.
        Stage("C", 280, image_size=224, frames=8, frame_size=112, video_share=0.4, restart_lr=0.5),
    ])

    def then(self, stage: Stage) -> TrainConfig:
        """This configuration with `stage` run after its last one."""
        return replace(self, stages=[*self.stages, stage])

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        return self.stages[-1]

    def lr_cycles(self) -> list[tuple[int, int, float]]:
        """(first step, length, peak) of each learning-rate cycle: the first starts at step 0 with peak 1, and
        each stage with `restart_lr` starts another that runs to the next one."""
        cycles: list[list] = [[0, 0, 1.0]]
        start = 0
        for stage in self.stages:
            if stage.restart_lr is not None and start > 0:
                cycles.append([start, 0, stage.restart_lr])
            cycles[-1][1] += stage.steps
            start += stage.steps
        return [tuple(c) for c in cycles]

    def lr_factor(self, step: int) -> float:
        """Within each cycle: linear warm-up, then cosine decay to `min_lr_fraction` of its peak at its last step."""
        first, length, peak = next(c for c in reversed(self.lr_cycles()) if c[0] <= step)
        local = step - first
        if local < self.warmup_steps:
            return peak * (local + 1) / self.warmup_steps
        progress = (local - self.warmup_steps) / max(1, length - self.warmup_steps)
        return peak * (self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 *
                       (1 + math.cos(math.pi * min(1.0, progress))))


OBJECT_WEIGHT = 9.0  # an object patch counts this much more than a background patch in the position loss


# Stages tried after the product's run, and not adopted (docs/fidelity.md says why). `train-reference --then NAME`
# runs one after the product's stages, from the same seed, so each of them is reproducible by one command.
TRIED_STAGES = {
    # more of stage C's kind, half of it on clips, under a gentler restart
    "D": Stage("D", 150, image_size=224, frames=8, frame_size=112, video_share=0.5, restart_lr=0.3),
    # mostly clips, and the projector is asked to keep each patch's place in its frame (`position_readout_loss`)
    "E": Stage("E", 180, image_size=224, frames=8, frame_size=112, video_share=0.6, restart_lr=0.5,
               position_loss=0.5),
    # after E (--then E --then F): clips only, each showing the moving object alone and asking only its direction
    # (does direction learn without the distractors? It did not in 40 steps: docs/fidelity.md)
    "F": Stage("F", 100, image_size=224, frames=8, frame_size=112, video_share=1.0, restart_lr=0.5,
               position_loss=0.5, distractors=False),
}


def patch_coordinates(n_patches: int) -> torch.Tensor:
    """(n, 2): each patch's (x, y) centre in [0, 1] on its square grid, in the row-major order of the encoder."""
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"{n_patches} patches are not a square grid")
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1)


def object_patches(frames, size: int, n_patches: int, min_cover: float = 0.2) -> torch.Tensor:
    """(len(frames) * n,) bool: which patches of each frame (resized to `size`) are at least `min_cover` object
    rather than background."""
    grid = math.isqrt(n_patches)
    background = np.asarray(syn.BACKGROUND, dtype=np.int16)
    cover = []
    for im in frames:
        px = np.asarray(im.convert("RGB").resize((size, size), 3), dtype=np.int16)
        drawn = (np.abs(px - background).sum(-1) > 30).astype(np.float32)
        cut = drawn[: grid * (size // grid), : grid * (size // grid)]
        cover.append(cut.reshape(grid, size // grid, grid, size // grid).mean(axis=(1, 3)).reshape(-1))
    return torch.from_numpy(np.concatenate(cover) >= min_cover)


def position_readout_loss(tokens: torch.Tensor, n_patches: int, weights: torch.Tensor | None = None,
                          ridge: float = 1e-3) -> torch.Tensor:
    """How badly a linear readout recovers each visual token's place in its frame from the projector's output:
    the residual of a (weighted) ridge regression fitted on the batch itself, relative to the coordinates'
    variance (1 = no information, 0 = exact). Differentiable through the fit, so it needs no extra trained head.

    Why: the LLM sees a clip as one long run of tokens with no frame boundaries, so a patch's place within its
    frame cannot come from its sequence position; it must be carried in the token itself. DINOv2's features
    carry it (a linear probe reads an object patch's column at 92%), but a projector trained on answers alone
    lets much of it go (40%), and "which way does it move" stays at chance. This term keeps it; `weights` lets
    the object patches, which the questions are about, count more than the background. (Stage E: it brought the
    code back, 1.04 -> 0.13, but 180 steps did not teach direction; docs/fidelity.md.)"""
    z = tokens.reshape(-1, tokens.shape[-1]).float()
    y = patch_coordinates(n_patches).repeat(z.shape[0] // n_patches, 1)
    w = torch.ones(z.shape[0]) if weights is None else weights.float()
    # cross-fitted: the readout fitted on one half of the frames is scored on the other, and the other way
    # round, so a readout cannot memorise the few object patches of a batch
    half = (z.shape[0] // n_patches // 2) * n_patches
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    residual, total = z.new_zeros(()), z.new_zeros(())
    for fit_rows, score_rows in folds:
        wf = w[fit_rows, None] / w[fit_rows].sum()
        z_mean, y_mean = (wf * z[fit_rows]).sum(0), (wf * y[fit_rows]).sum(0)
        zf, yf = (z[fit_rows] - z_mean) * wf.sqrt(), (y[fit_rows] - y_mean) * wf.sqrt()
        gram = zf.T @ zf
        fit = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0]), zf.T @ yf)
        ws = w[score_rows, None]
        residual = residual + (ws * (y[score_rows] - y_mean - (z[score_rows] - z_mean) @ fit) ** 2).sum()
        total = total + (ws * (y[score_rows] - y_mean) ** 2).sum()
    return residual / total


def product_meta(config: TrainConfig, step: int, history: list[dict]) -> dict:
    return {"config": asdict(config), "steps_done": step, "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_alpha,
            "final_loss": float(np.mean([h["loss"] for h in history[-20:]])) if history else None}


def export_checkpoint(run_dir: Path, out: Path, config: TrainConfig | None = None) -> int:
    """Writes the product of a run's latest checkpoint (e.g. to evaluate while training goes on); returns its
    step."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    save_product(state["projector"], state["lora"], product_meta(config or TrainConfig(), state["step"],
                                                                 state["history"]), out)
    return state["step"]


def normalize(images, size: int, mean, std) -> torch.Tensor:
    """(N, 3, size, size): bicubic resize, [0, 1], mean/std — the same steps as the engine's adapter."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    out = [(np.asarray(im.convert("RGB").resize((size, size), 3), dtype=np.float32).transpose(2, 0, 1) / 255.0 - m)
           / s for im in images]
    return torch.from_numpy(np.stack(out))


class Trainer:
    def __init__(self, base_dir: Path, run_dir: Path, config: TrainConfig, threads: int | None = None):
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.model = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        from transformers import AutoImageProcessor

        ip = AutoImageProcessor.from_pretrained(base_dir)
        self.mean, self.std = ip.image_mean, ip.image_std
        for p in self.model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(config.seed)
        projector = self.model.model.multi_modal_projector
        for layer in (projector.linear_1, projector.linear_2):
            torch.nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
            torch.nn.init.zeros_(layer.bias)
        for p in projector.parameters():
            p.requires_grad_(True)
        self.lora = add_lora(self.model.model.language_model.layers, config.lora_rank, config.lora_alpha, config.seed)
        lora_params = [p for l in self.lora.values() for p in (l.lora_a, l.lora_b)]
        self.optimizer = torch.optim.AdamW([
            {"params": list(projector.parameters()), "lr": config.lr_projector, "weight_decay": 0.0},
            {"params": lora_params, "lr": config.lr_lora, "weight_decay": 0.0},
        ], betas=(0.9, 0.98))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0
        self.history: list[dict] = []
        self.layers = self.model.config.vision_feature_layer
        self.image_id = self.model.config.image_token_id
        self.video_id = self.model.config.video_token_id
        self._resume()

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _ckpt(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def _resume(self) -> None:
        if not self._ckpt().is_file():
            return
        state = torch.load(self._ckpt(), weights_only=False)
        self.model.model.multi_modal_projector.load_state_dict(state["projector"])
        load_lora_state(self.lora, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]

    def save(self) -> None:
        state = {"projector": self.model.model.multi_modal_projector.state_dict(), "lora": lora_state(self.lora),
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "history": self.history}
        torch.save(state, f"{self._ckpt()}.part")
        Path(f"{self._ckpt()}.part").replace(self._ckpt())
        (self.run_dir / "history.json").write_text(json.dumps(self.history) + "\n")

    def export(self, out: Path | None = None) -> None:
        save_product(self.model.model.multi_modal_projector.state_dict(), lora_state(self.lora),
                     product_meta(self.config, self.step, self.history), out or PRODUCT_DIR)

    # ---- data ------------------------------------------------------------------------------------------------
    def _batch_examples(self, step: int) -> tuple[str, list[syn.Example]]:
        stage = self.config.stage_at(step)
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 7, step]))
        kind = "video" if rng.random() < stage.video_share else "image"
        base = step * self.config.batch_size
        if kind == "image":
            return kind, [syn.make_image(self.config.seed, "train", base + k, stage.image_size)
                          for k in range(self.config.batch_size)]
        return kind, [syn.make_video(self.config.seed, "train", base + k, stage.frame_size, stage.frames,
                                     stage.distractors) for k in range(self.config.batch_size)]

    def _sequence(self, ex: syn.Example, n_visual: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """Token ids of the whole chat with the placeholder expanded to `n_visual` copies, and the positions
        whose next token is supervised."""
        qas = [ex.qas[i] for i in rng.permutation(len(ex.qas))]
        placeholder = "<image>\n" if ex.kind == "image" else "<video>\n"
        ids: list[int] = []
        targets: list[int] = []
        for turn, qa in enumerate(qas):
            prompt = "<|im_start|>user\n" + (placeholder if turn == 0 else "") + qa.question + \
                     "<|im_end|>\n<|im_start|>assistant\n"
            p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = self.tokenizer(qa.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids += p_ids
            targets += list(range(len(ids) - 1, len(ids) - 1 + len(a_ids)))
            ids += a_ids + self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        pid = self.image_id if ex.kind == "image" else self.video_id
        at = ids.index(pid)
        ids = ids[:at] + [pid] * n_visual + ids[at + 1:]
        targets = [t + n_visual - 1 if t >= at else t for t in targets]
        return ids, targets

    def _visual(self, kind: str, examples: list[syn.Example], size: int) -> torch.Tensor:
        """(B, n_visual, d) projector outputs; the encoder runs without gradients."""
        frames = [f for ex in examples for f in ex.frames]
        pixels = normalize(frames, size, self.mean, self.std)
        with torch.no_grad():
            hs = self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            feats = torch.cat([hs[i][:, 1:] for i in self.layers], dim=-1)
        out = self.model.model.multi_modal_projector(feats)  # (B*T, n, d)
        return out.reshape(len(examples), -1, out.shape[-1]), out.shape[1]

    def loss_for_step(self, step: int) -> tuple[torch.Tensor, dict]:
        """The training loss of `step` and its parts: `loss` (cross-entropy on the answers), `answers`, and
        `position` (the position-readout loss, in stages that weigh it)."""
        stage = self.config.stage_at(step)
        kind, examples = self._batch_examples(step)
        size = stage.image_size if kind == "image" else stage.frame_size
        visual, n_patches = self._visual(kind, examples, size)
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 8, step]))
        seqs = [self._sequence(ex, visual.shape[1], rng) for ex in examples]
        length = max(len(ids) for ids, _ in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([s + [pad] * (length - len(s)) for s, _ in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s, _ in seqs])
        lm = self.model.model.language_model
        embeds = lm.embed_tokens(ids)
        is_media = (ids == self.image_id) | (ids == self.video_id)
        embeds = embeds.masked_scatter(is_media[..., None], visual.to(embeds.dtype))
        hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        rows = torch.tensor([b for b, (_, t) in enumerate(seqs) for _ in t])
        cols = torch.tensor([c for _, t in seqs for c in t])
        logits = self.model.lm_head(hidden[rows, cols])
        labels = ids[rows, cols + 1]
        answer_loss = F.cross_entropy(logits.float(), labels)
        parts = {"loss": float(answer_loss.detach()), "answers": len(cols)}
        if not stage.position_loss:
            return answer_loss, parts
        frames = [f for ex in examples for f in ex.frames]
        weights = 1.0 + OBJECT_WEIGHT * object_patches(frames, size, n_patches).float()
        position = position_readout_loss(visual, n_patches, weights)
        parts["position"] = float(position.detach())
        return answer_loss + stage.position_loss * position, parts

    def train(self, until_step: int | None = None, save_every: int = 10, log=print) -> None:
        until = min(until_step or self.config.total_steps, self.config.total_steps)
        t0 = time.perf_counter()
        while self.step < until:
            factor = self.config.lr_factor(self.step)
            for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = lr * factor
            loss, parts = self.loss_for_step(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
            self.optimizer.step()
            self.step += 1
            self.history.append({"step": self.step, "stage": self.config.stage_at(self.step - 1).name,
                                 "seconds": time.perf_counter() - t0,
                                 **{k: v for k, v in parts.items() if k != "answers"}})
            if self.step % 5 == 0:
                recent = self.history[-5:]
                extra = [h["position"] for h in recent if "position" in h]
                log(f"step {self.step}/{self.config.total_steps} stage {recent[-1]['stage']} "
                    f"loss {np.mean([h['loss'] for h in recent]):.3f}"
                    + (f" position {np.mean(extra):.3f}" if extra else "")
                    + f" ({recent[-1]['seconds']:.0f}s)")
            if self.step % save_every == 0 or self.step == until:
                self.save()
