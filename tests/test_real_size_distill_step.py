"""benchmarks/real_size_distill_step.py at tiny size on the CPU: the real trainer runs with and without gradient
checkpointing on the 60-block Qwen-Image class, and the reported counts match independent ones. No timing checks
beyond "positive"."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bench_loader import benchmark_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script as a module."""
    with benchmark_module("real_size_distill_step.py") as module:
        yield module


def _tiny_teacher(bench: ModuleType) -> torch.nn.Module:
    """The tiny config built directly by diffusers on the CPU (independent of the benchmark's meta path)."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**bench.TINY)


def test_tiny_run_both_checkpointing_settings(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(bench, "append", lambda *a: results_md.write_text("appended"))  # must not be called
    out = tmp_path / "r.json"
    result = bench.main(
        ["--tiny", "--device", "cpu", "--steps", "2", "--no-append", "--json", str(out), "--tmp-root", str(tmp_path)]
    )
    assert not results_md.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ppcl_distill_step_")]  # run folders deleted
    saved = json.loads(out.read_text())
    assert saved["runs"].keys() == {"off", "on"}
    assert [saved["runs"][k]["gradient_checkpointing"] for k in ("off", "on")] == [False, True]
    for run in saved["runs"].values():
        assert run["out_of_memory"] is False and len(run["step_seconds"]) == 2
        times = [
            *run["step_seconds"],
            run["first_step_s"],
            run["later_steps_median_s"],
            run["trainer_seconds_per_step"],
        ]
        assert all(math.isfinite(t) and t > 0 for t in times), run
        assert math.isfinite(run["final_loss"])
        assert run["peak_allocated_gb"] is None and run["memory_before_training_gb"] is None  # CPU: not measured
    # Fresh students, same data and seed: recomputing the student in backward changes nothing.
    assert saved["runs"]["on"]["final_loss"] == pytest.approx(saved["runs"]["off"]["final_loss"], rel=1e-3, abs=1e-12)
    # Counts, computed independently: the default span is the public [15, 24]; its student copies block 15.
    teacher = _tiny_teacher(bench)
    assert saved["spans"] == [[15, 24]]
    assert saved["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    assert saved["student_params"] == sum(p.numel() for p in teacher.transformer_blocks[15].parameters())
    assert saved["teacher_gb"] == pytest.approx(2 * saved["teacher_params"] / 1e9)  # bf16
    # from_plan copies the bf16 teacher block; the benchmark casts the students to fp32 masters.
    assert (saved["student_dtype_from_plan"], saved["student_dtype"]) == ("bfloat16", "float32")
    assert saved["students_cast_to_float32"] is True
    assert result["image_tokens"] == (128 // 16) ** 2 and result["text_tokens"] == 16


def test_several_spans_and_data(bench: ModuleType) -> None:
    assert bench.parse_spans("15-24, 42-43") == [(15, 24), (42, 43)]
    with pytest.raises(SystemExit, match="not u-v"):
        bench.parse_spans("15:24")
    teacher = bench.build_meta_teacher(bench.TINY)
    plan = bench.build_depth_plan(teacher, [(15, 24), (42, 43)])
    addon, dtype = bench.make_students(teacher, plan)
    blocks = _tiny_teacher(bench).transformer_blocks
    assert sum(p.numel() for p in addon.students.parameters()) == sum(
        p.numel() for i in (15, 42) for p in blocks[i].parameters()
    )
    assert dtype == "float32" and all(p.dtype == torch.float32 for p in addon.students.parameters())
    data = bench.SyntheticBatches(bench.TINY, 128, 128, 16, torch.device("cpu"), torch.bfloat16)
    first, again, other = data.batch(3), data.batch(3), data.batch(4)
    assert "return_dict" not in first and first["img_shapes"] == [(1, 8, 8)]
    assert all(torch.equal(first[k], again[k]) for k in ("hidden_states", "encoder_hidden_states", "timestep"))
    assert not torch.equal(first["hidden_states"], other["hidden_states"])
    assert 0.0 <= float(first["timestep"]) <= 1.0 and data.batch_size == 1 and data.describe()["height"] == 128


def test_full_size_needs_a_gpu(bench: ModuleType) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full-size run would start")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.run(bench.parse_args(["--device", "cpu"]))


def test_the_q8_0_teacher_is_what_a_gguf_file_holds(bench: ModuleType, tmp_path: Path) -> None:
    """The benchmark's torch Q8_0 packer writes the bytes of the ``gguf`` package's own quantiser (ground truth;
    seeded weights with an all-zero block), and the tiny run trains fp32 students from that GGUF teacher."""
    import gguf

    for seed in range(4):
        weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(seed)) * 0.3
        weight[2, 32:64] = 0
        weight[3, :32] = torch.cat([torch.tensor([127.0]), torch.arange(31) - 15.5])  # d = 1: exact halves
        expected = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert bench.pack_q8_0(weight).numpy().tobytes() == expected.tobytes(), seed
    result = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--checkpointing", "on", "--quantize", "q8_0",
                         "--no-append", "--tmp-root", str(tmp_path)])  # fmt: skip
    assert result["quantize"] == "q8_0" and result["student_dtype"] == "float32"
    assert math.isfinite(result["runs"]["on"]["final_loss"])
