"""Rectified-flow training of the toy teacher on ShapesWorld.

Every step's data and noise come from generators seeded by ``(seed, step)``, so a run is a pure function of its
arguments, and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ppcl.errors import ConfigError
from ppcl.io import atomic_folder, load_state, save_state, write_text
from ppcl.logging import get_logger, progress
from ppcl.outputs import CHECKPOINT, OutputKind, is_kind
from ppcl.toy.teacher import ToyTeacher, patchify
from ppcl.toy.world import sample_batch

# A folder train_teacher wrote: its loss log, its state or the finished teacher's card.
TOY_TEACHER_RUN = OutputKind(
    "toy-teacher run", ("loss.jsonl", "state/trainer_state.json", "trainer_state.pt", "toy_teacher.json")
)

log = get_logger("toy.train")

STATE_DIR = "state"  # trainer_state.json + .safetensors (ppcl.io.save_state), written atomically: nothing pickled
LEGACY_STATE_FILE = "trainer_state.pt"  # earlier runs (torch.save); still resumed from, with a deprecation note


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Hyper-parameters of teacher training (all recorded in the card)."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250


def _lr_at(cfg: TeacherTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _batch(cfg: TeacherTrainConfig, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Images ``(B, 64, 48)``, captions (some dropped to ""), times ``(B,)`` and noise ``(B, 64, 48)`` of one step."""
    rng = np.random.default_rng([cfg.seed, step])
    images, captions = sample_batch(rng, cfg.batch_size)
    drop = rng.random(cfg.batch_size) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop, strict=False)]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    # Logit-normal times concentrate training on the middle of the trajectory, where the image takes shape.
    t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))
    x0 = patchify(torch.from_numpy(images))
    noise = torch.randn(x0.shape, generator=gen)
    return x0, captions, t, noise


def flow_loss(teacher: ToyTeacher, x0: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor):
    """Rectified-flow loss: x_t = (1−t)·x0 + t·ε, target ε − x0; returns a scalar tensor."""
    tt = t[:, None, None]
    x_t = (1 - tt) * x0 + tt * noise
    emb, mask = teacher.embed(captions)
    pred = teacher.velocity(x_t, t, emb, mask)
    return torch.mean((pred - (noise - x0)) ** 2)


class _Ema:
    """Exponential moving average of a set of parameters."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        # Warm the average up so early, random weights do not dominate it.
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)


def _params(teacher: ToyTeacher) -> dict[str, torch.Tensor]:
    named = {f"transformer.{k}": v for k, v in teacher.transformer.named_parameters()}
    named.update({f"text_encoder.{k}": v for k, v in teacher.text_encoder.named_parameters()})
    return named


def _ema_teacher(teacher: ToyTeacher, ema: _Ema) -> ToyTeacher:
    out = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, param in _params(out).items():
            param.copy_(ema.shadow[name])
    out.transformer.eval().requires_grad_(False)
    out.text_encoder.eval().requires_grad_(False)
    return out


def train_teacher(
    cfg: TeacherTrainConfig,
    out_dir: str | os.PathLike[str],
    command: str = "",
    model_config: dict | None = None,
    stop_at: int | None = None,
) -> ToyTeacher | None:
    """Train (or resume) the toy teacher; writes the EMA teacher to ``out_dir`` and returns it.

    ``out_dir`` also receives ``loss.jsonl`` (one line per 10 steps) and a resumable ``state/`` (JSON + safetensors).
    ``model_config`` overrides the transformer config (tests use a tiny one). ``stop_at`` ends the run after that
    many steps with a checkpoint but no final teacher, as a pre-empted job would, and returns None.
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not is_kind(out, TOY_TEACHER_RUN):
        raise ConfigError(
            "the output folder holds files that are not a toy-teacher run",
            expected="a new, empty or toy-teacher folder (it resumes from its state/)",
            found=f"{out} is not empty",
            fix="choose another --out (ppcl does not write into a folder it did not create)",
        )
    out.mkdir(parents=True, exist_ok=True)
    teacher = ToyTeacher.build(seed=cfg.seed, config=model_config)
    params = _params(teacher)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = _Ema(params, cfg.ema_decay)
    start, elapsed = _maybe_resume(out, params, opt, ema)
    log.info("toy teacher: training steps %d..%d at batch %d", start, cfg.steps, cfg.batch_size)
    modules = nn.ModuleList([teacher.transformer, teacher.text_encoder]).train()
    t0 = time.time() - elapsed
    window: list[float] = []
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for step in progress(range(start, end), desc="train toy teacher", total=end - start):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        loss = flow_loss(teacher, *_batch(cfg, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(modules.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(params, step)
        window.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            _append_jsonl(
                out / "loss.jsonl",
                {
                    "step": step + 1,
                    "loss": float(np.mean(window)),
                    "lr": _lr_at(cfg, step),
                    "elapsed_s": round(time.time() - t0, 1),
                },
            )
            window = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_state(out, step + 1, time.time() - t0, params, opt, ema)
    if end < cfg.steps:
        return None
    final = _ema_teacher(teacher, ema)
    card = {
        "config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dict(final.transformer.config).items()
            if not k.startswith("_")
        },
        "text_encoder": final.text_encoder.config(),
        "train": asdict(cfg),
        "command": command,
        "train_time_s": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": _final_loss(out / "loss.jsonl"),
    }
    final.save(out, card)
    log.info("toy teacher: saved to %s (%.0f s)", out, card["train_time_s"])
    return final


def _final_loss(path: Path) -> float | None:
    lines = path.read_text().strip().splitlines() if path.exists() else []
    tail = [json.loads(line)["loss"] for line in lines[-20:]]
    return round(float(np.mean(tail)), 5) if tail else None


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _save_state(out: Path, step: int, elapsed: float, params, opt, ema: _Ema) -> None:
    state = {
        "step": step,
        "elapsed": elapsed,
        "params": {k: v.detach() for k, v in params.items()},
        "opt": opt.state_dict(),
        "ema": ema.shadow,
    }
    with atomic_folder(out / STATE_DIR, CHECKPOINT, overwrite=True) as tmp:
        save_state(state, tmp, "trainer_state")
    (out / LEGACY_STATE_FILE).unlink(missing_ok=True)


def _maybe_resume(out: Path, params, opt, ema: _Ema) -> tuple[int, float]:
    if (out / STATE_DIR / "trainer_state.json").is_file():
        state = load_state(out / STATE_DIR, "trainer_state", "toy teacher trainer state")
    elif (out / LEGACY_STATE_FILE).is_file():
        log.warning(
            "%s is in the old torch.save format; the next save replaces it with %s/", out / LEGACY_STATE_FILE, STATE_DIR
        )
        state = torch.load(out / LEGACY_STATE_FILE, weights_only=True)
    else:
        (out / "loss.jsonl").unlink(missing_ok=True)
        return 0, 0.0
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(state["params"][k])
    opt.load_state_dict(state["opt"])
    ema.shadow = state["ema"]
    _truncate_jsonl(out / "loss.jsonl", state["step"])
    log.info("toy teacher: resuming at step %d", state["step"])
    return int(state["step"]), float(state["elapsed"])


def _truncate_jsonl(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text("".join(r + "\n" for r in rows), path)
