"""The toy teacher: packing, training determinism and resume, sampling, and the committed weights + card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ppcl.errors import ArtefactError
from ppcl.toy.benchmark import score_model
from ppcl.toy.sampler import SamplerConfig, sample
from ppcl.toy.teacher import ASSETS, TEACHER_CONFIG, TRANSFORMER_FILE, ToyTeacher, load_card, patchify, unpatchify
from ppcl.toy.train_teacher import TeacherTrainConfig, train_teacher

TINY = {
    **TEACHER_CONFIG,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "axes_dims_rope": (4, 6, 6),
}


def test_patchify_roundtrip_and_layout():
    images = torch.randn(2, 3, 32, 32)
    tokens = patchify(images)
    assert tokens.shape == (2, 64, 48)
    assert torch.equal(unpatchify(tokens), images)
    # token 1 is the patch at row 0, columns 4..7; its first 16 features are the red channel of that patch
    assert torch.equal(tokens[0, 1, :16].reshape(4, 4), images[0, 0, 0:4, 4:8])


def _train(tmp_path, name, steps, stop_at=None):
    cfg = TeacherTrainConfig(steps=steps, batch_size=4, warmup=2, checkpoint_every=2, seed=3)
    return train_teacher(cfg, tmp_path / name, model_config=TINY, stop_at=stop_at)


def _weights(teacher):
    return {k: v.clone() for k, v in teacher.transformer.state_dict().items()}


def test_teacher_training_is_deterministic_and_resumes_exactly(tmp_path):
    full = _weights(_train(tmp_path, "a", steps=6))
    again = _weights(_train(tmp_path, "b", steps=6))
    assert _train(tmp_path, "c", steps=6, stop_at=4) is None  # pre-empted after 4 steps
    resumed = _weights(_train(tmp_path, "c", steps=6))
    for key in full:
        assert torch.equal(full[key], again[key]), key
        assert torch.equal(full[key], resumed[key]), key
    card = json.loads((tmp_path / "a" / "toy_teacher.json").read_text())
    assert card["train"]["steps"] == 6 and card["config"]["num_layers"] == 2


def test_sampling_is_seeded_per_image():
    teacher = ToyTeacher.build(seed=0, config=TINY)
    cfg = SamplerConfig(steps=2, guidance=2.0)
    a = sample(teacher, ["a red circle", "a blue square"], [5, 6], cfg)
    b = sample(teacher, ["a blue square"], [6], cfg)
    assert a.shape == (2, 32, 32, 3) and a.dtype.name == "uint8"
    assert (a[1].astype(int) - b[0].astype(int)).__abs__().max() <= 1  # batch composition does not matter


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ArtefactError, match="train-teacher"):
        ToyTeacher.load(tmp_path)


def test_committed_teacher_meets_the_spec():
    config = load_card()["config"]
    assert config["num_layers"] >= 16
    assert 128 <= config["num_attention_heads"] * config["attention_head_dim"] <= 192
    weights = load_file(str(ASSETS / TRANSFORMER_FILE))
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert (ASSETS / TRANSFORMER_FILE).stat().st_size <= 25 * 2**20
    teacher = ToyTeacher.load()
    assert not any(p.requires_grad for p in teacher.transformer.parameters())


def test_committed_teacher_scores_as_its_card_says():
    """Re-run the card's ShapesEval protocol once; both scorers' numbers must match what the card reports.

    The card's ``shapes_eval`` holds the strict scores (the entry it always had), ``shapes_eval_robust`` the robust
    ones; ``score_model`` returns the robust ones at the top level and the strict ones under ``"strict"``.
    """
    card = load_card()
    proto = card["shapes_eval_protocol"]
    result = score_model(
        ToyTeacher.load(),
        n_per_category=proto["per_category"],
        seeds=tuple(range(proto["seeds"])),
        sampler=SamplerConfig(steps=proto["sampler_steps"], guidance=proto["guidance"]),
    )
    for scores, stored in ((result["strict"], card["shapes_eval"]), (result, card["shapes_eval_robust"])):
        for key in ("overall", "single", "two_objects", "position", "color"):
            # Same machine kind gives the same images; allow a few flipped images for another CPU's float rounding.
            assert scores[key] == pytest.approx(stored[key], abs=0.03), key
        assert scores["n_images"] == stored["n_images"]


def test_deeper_committed_teacher_loads_by_name():
    """``toy24`` (the deeper, more redundant teacher of issue 13): 24 fp16 blocks of width 96, a card that says how
    it was trained and scored, and the demo's name resolution."""
    from ppcl.toy.teacher import COMMITTED, teacher_folder

    folder = teacher_folder("toy24")
    assert folder == COMMITTED["toy24"] and teacher_folder("some/folder").as_posix() == "some/folder"
    card = load_card(folder)
    assert card["config"]["num_layers"] == 24
    assert card["config"]["num_attention_heads"] * card["config"]["attention_head_dim"] == 96
    assert {"shapes_eval", "shapes_eval_robust", "train", "command"} <= set(card)
    weights = load_file(str(folder / TRANSFORMER_FILE))
    assert all(v.dtype == torch.float16 for v in weights.values())
    teacher = ToyTeacher.load(folder)
    assert len(teacher.transformer.transformer_blocks) == 24
    assert not any(p.requires_grad for p in teacher.transformer.parameters())
