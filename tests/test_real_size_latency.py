"""benchmarks/real_size_latency.py at tiny size on the CPU: the three variants build, merge, borrow the teacher's
tensors and run; the real 20B config and the public plan build on the meta device (no memory). No timing checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from bench_loader import benchmark_module
from ppcl.modules.projection import ResidualLinear


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script as a module."""
    with benchmark_module("real_size_latency.py") as module:
        yield module


def test_tiny_run_times_three_variants(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results_md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(bench, "append", lambda *a: results_md.write_text("appended"))  # must not be called
    out = tmp_path / "r.json"
    result = bench.main(["--tiny", "--device", "cpu", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    assert not results_md.exists()  # --tiny on the CPU never appends by default
    assert json.loads(out.read_text())["variants"].keys() == result["variants"].keys()
    variants = result["variants"]
    assert list(variants) == ["teacher", "depth", "depth+width"]
    # The public plan: 60 → 35 blocks (25 removed by 13 intervals); width changes no block count.
    assert [v["blocks"] for v in variants.values()] == [60, 35, 35]
    tokens = (128 // 16) ** 2
    assert result["image_tokens"] == tokens
    assert all(v["output_shape"] == [1, tokens, 2 * 2 * 4] for v in variants.values())  # patch^2 x out_channels
    assert all(v["median_ms"] > 0 and v["min_ms"] > 0 for v in variants.values())
    assert variants["teacher"]["ratio"] == 1.0
    assert variants["teacher"]["flops"] > variants["depth"]["flops"] > variants["depth+width"]["flops"] > 0
    # Parameters: exactly the plan's counts; width < depth < teacher.
    assert all(v["params"] == v["plan_params"] for v in variants.values())
    assert variants["teacher"]["params"] > variants["depth"]["params"] > variants["depth+width"]["params"]
    # Memory claim: the depth model borrows every tensor; depth+width allocates only its 15 projections, each
    # D x D + D (D = 32): runs [36,37] and [40,41] → in + out each; [50,59] → in for 51, 52, 54, 56, 58, 59 (53, 55, 57
    # are depth-removed) + out; FFN 2 (image + text), 58 and 59 (image; their text is pruned).
    assert variants["depth"]["allocated_extra"] == 0
    assert variants["depth+width"]["allocated_extra"] == 15 * (32 * 32 + 32)


def test_merged_models_share_the_teacher_storage(bench: ModuleType) -> None:
    import torch

    teacher = bench.build_meta_teacher(bench.TINY)
    merged = bench.merged_on_meta(teacher, bench.build_plan(teacher, bench.PUBLIC))
    bench.materialize(teacher, torch.device("cpu"), torch.float32)
    donor = dict(teacher.named_parameters())
    teacher_ptrs = {p.untyped_storage().data_ptr() for p in donor.values()}
    for level, (model, kept) in merged.items():
        bench.materialize(model, torch.device("cpu"), torch.float32, 1, donor, kept)
        for module in model.modules():
            own = {p.untyped_storage().data_ptr() for p in module.parameters(recurse=False)}
            if isinstance(module, ResidualLinear):
                assert not own & teacher_ptrs and module.W.dtype == torch.float32, level
            else:
                assert own <= teacher_ptrs, level
        assert not any(p.is_meta for p in model.parameters())


def test_real_config_and_public_plan_on_meta(bench: ModuleType) -> None:
    teacher = bench.build_meta_teacher(bench.QWEN_IMAGE_20B)
    plan = bench.build_plan(teacher, bench.PUBLIC)
    count = plan.param_count(dict(teacher.config), bench.DEPTH)
    assert len(teacher.transformer_blocks) == 60 and count.blocks_after == 35
    assert (count.total, count.after) == (20_430_401_088, 11_934_618_688)  # as tests/test_plan.py pins them
    width = plan.param_count(dict(teacher.config), bench.WIDTH)
    # 10.45B: the release's 10.604B still holds text projections nothing reads (METHOD.md Stage 2).
    assert width.blocks_after == 35 and width.after == 10_452_608_064
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.run(bench.parse_args(["--device", "cpu"]))


def test_full_size_flops_on_meta(bench: ModuleType) -> None:
    # The real 20B model at 1328 px with 256 text tokens, counted on the meta device: nothing is allocated or timed.
    result = bench.run(bench.parse_args(["--flops-only", "--device", "cpu"]))
    variants = result["variants"]
    assert result["image_tokens"] == 83 * 83
    assert [v["blocks"] for v in variants.values()] == [60, 35, 35]
    assert all("median_ms" not in v for v in variants.values())
    # Per image token, a block's image stream does 2 x 113.2M FLOPs (QKV/out 4 D^2, FFN 8 D^2, D = 3072), plus attention
    # over 7145 tokens: about 135 TFLOPs for 60 blocks.
    assert variants["teacher"]["flops"] == pytest.approx(134.76e12, rel=1e-3)
    assert variants["depth"]["flops_ratio"] == pytest.approx(0.5834, abs=1e-3)
    assert variants["depth+width"]["flops_ratio"] == pytest.approx(0.5604, abs=1e-3)
