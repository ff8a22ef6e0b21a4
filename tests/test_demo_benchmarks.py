"""The demo benchmark helpers: variant parsing and tables (benchmarks/demo_variants.py), sub-level grouping
(benchmarks/width_sublevels.py). The runs themselves are the demo's, tested in test_demo."""

from __future__ import annotations

from dataclasses import asdict

from bench_loader import benchmark_module
from ppcl.demo import DemoConfig


def test_variants_parse_and_tabulate() -> None:
    with benchmark_module("demo_variants.py") as bench:
        name, overrides = bench.parse_variant("long:depth_steps=450,lr=1e-3,width_base=p25,text_cka_threshold=None")
        assert name == "long"
        assert overrides == {"depth_steps": 450, "lr": 1e-3, "width_base": "p25", "text_cka_threshold": None}
        assert bench.parse_variant("default:") == ("default", {})
        config = {**asdict(DemoConfig.full()), "depth_steps": 450}
        level = {
            "block_params_removed": 0.3,
            "R": 0.05,
            "guided_nmse": 0.06,
            "psnr_db": 20.0,
            "shapes_eval": {
                "single": 0.9,
                "two_objects": 0.5,
                "position": 0.8,
                "color": 1.0,
                "strict": {"single": 0.9, "two_objects": 0.4, "position": 0.8, "color": 1.0},
            },
        }
        teacher = {
            "R": 0.0,
            "shapes_eval": {
                "single": 1.0,
                "two_objects": 0.8,
                "position": 1.0,
                "color": 1.0,
                "strict": {"single": 1.0, "two_objects": 0.8, "position": 1.0, "color": 1.0},
            },
        }
        run = {"config": config, "timings": {"total": 600.0}, "levels": {"teacher": teacher, "p25": level}}
        text = bench.table({"long": run})
        assert "{'depth_steps': 450}" in text and "| 10.0 |" in text
        assert "30.0% / 5.0% / 20.0% / 0.060 / 20.0" in text  # strict R: (0.1 + 0.5 + 0.2 + 0) / 4 = 20%


def test_sublevels_group_a_level_by_replacement_kind() -> None:
    with benchmark_module("width_sublevels.py") as bench:
        groups = bench.sublevels(("depth:5-7", "text:14-16", "ffn:1", "depth:7-12", "text:0-3"))
    assert groups["depth"] == ("depth:5-7", "depth:7-12")
    assert groups["depth + FFNs"] == ("depth:5-7", "depth:7-12", "ffn:1")
    assert groups["depth + text runs"] == ("depth:5-7", "depth:7-12", "text:14-16", "text:0-3")
    assert groups["depth + text:0-3"] == ("depth:5-7", "depth:7-12", "text:0-3")
    assert len(groups) == 5
