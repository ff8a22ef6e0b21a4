"""``ppcl demo --fast`` end to end (the CI smoke run of the README's first command) and its report.html."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from ppcl.cli.main import main
from ppcl.demo import LEVELS


class _Collector(HTMLParser):
    """Tags, image sources, link targets and table cells of a page; checks that every opened tag is closed."""

    VOID: ClassVar[set[str]] = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.cells: list[str] = []
        self.errors: list[str] = []
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src"):
            target = values.get(key) or ""
            if target and not target.startswith("data:"):
                self.external.append(target)
        if tag in ("td", "th"):
            self._cell = True
            self.cells.append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag in ("td", "th"):
            self._cell = False

    def handle_data(self, data: str) -> None:
        if self._cell:
            self.cells[-1] += data


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out


def test_demo_writes_every_artefact(demo_out: Path) -> None:
    for name in ("report.html", "results.json", "plan/plan.json", "finetune/addon", "analysis"):
        assert (demo_out / name).exists(), name
    results = json.loads((demo_out / "results.json").read_text())
    assert list(results["levels"]) == ["teacher", *LEVELS]
    removed = [results["levels"][lv]["block_params_removed"] for lv in LEVELS]
    assert 0 < removed[0] < removed[1] and removed[2] >= 0.45, removed
    for name, row in results["levels"].items():
        assert 0 <= row["shapes_eval"]["overall"] <= 1 and row["latency_ms"] > 0 and row["flops"] > 0, name
        assert -1 <= row["cosine"] <= 1
    assert results["levels"]["teacher"]["R"] == 0.0
    for name in LEVELS:  # the metrics that show what the sampler sees
        row = results["levels"][name]
        for key in ("guided_nmse", "direction_nmse", "direction_cosine", "cond_nmse", "uncond_nmse", "psnr_db"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row.get(key))
        assert len(row["x0_nmse"]) == 4 and all(math.isfinite(v) for v in row["x0_nmse"].values()), name
        for category in ("single", "two_objects", "position", "color"):
            assert 0 <= row["shapes_eval"][category] <= 1, (name, category)
    assert results["levels"]["teacher"]["guided_nmse"] == 0.0 and results["levels"]["teacher"]["psnr_db"] is None
    assert [s["stage"].split()[0] for s in results["stages"]] == ["depth", "+", "+"]


def test_report_html_is_valid_and_self_contained(demo_out: Path) -> None:
    page = (demo_out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    assert not parser.external, parser.external  # nothing to fetch: opens offline
    assert len(parser.images) >= 8
    for src in parser.images:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.verify()
        assert image.format == "PNG" and min(image.size) > 50
    for level in ("teacher", *LEVELS):
        assert level in parser.cells
    assert "ShapesEval overall" in parser.cells and "R" in parser.cells
    for column in ("guided NMSE", "direction NMSE", "PSNR (dB)", "strict overall", "two objects", "t in 0.75-1.00"):
        assert column in parser.cells, column


def test_demo_rerun_replaces_the_previous_run(demo_out: Path, tmp_path: Path) -> None:
    # A second run into the same folder must not trip over the first run's training folders.
    import shutil

    from ppcl.demo.run import _clear_previous_run

    copy = Path(shutil.copytree(demo_out, tmp_path / "copy"))
    (copy / "notes.txt").write_text("the user's own file")
    _clear_previous_run(copy)
    assert not (copy / "depth").exists() and not (copy / "report.html").exists()
    assert (copy / "notes.txt").exists()  # only the demo's own outputs are removed


def test_demo_rejects_bad_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--fast", "--depth-steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--depth-steps must be positive" in capsys.readouterr().err


def test_demo_plan_puts_width_on_the_chosen_depth_level() -> None:
    """The top level is ``width_base``'s depth spans + width replacements; a higher text-CKA threshold prunes fewer
    text runs; an unknown base is refused before anything trains."""
    from ppcl.analysis import RedundancyReport
    from ppcl.demo.run import DemoConfig, make_plan
    from ppcl.errors import ConfigError
    from ppcl.toy.teacher import ToyTeacher

    report = RedundancyReport.load(Path(__file__).parents[1] / "docs" / "example-report")
    model_config = ToyTeacher.load().transformer.config
    cfg = DemoConfig()
    on_p25 = make_plan(report, model_config, 3, "p25", None)  # the demo's earlier plan: every text run at CKA 0.95
    on_p40 = make_plan(report, model_config, cfg.ffn_blocks, cfg.width_base, cfg.text_cka_threshold)
    for plan, base in ((on_p25, "p25"), (on_p40, "p40")):
        depth = {r for r in plan.level(base).replacement_ids}
        top = set(plan.level("p50").replacement_ids)
        assert depth < top and {r for r in top if r.startswith("depth")} == depth
        assert plan.level("p50").replacement_ids != plan.level(base).replacement_ids
    runs = [r for r in on_p40.level("p50").replacement_ids if r.startswith("text")]
    assert len(runs) < len([r for r in on_p25.level("p50").replacement_ids if r.startswith("text")])
    assert sum(r.startswith("ffn") for r in on_p40.level("p50").replacement_ids) == cfg.ffn_blocks
    with pytest.raises(ConfigError, match="width base"):
        make_plan(report, model_config, 3, "p50", None)


def test_demo_plan_refuses_a_top_level_under_half() -> None:
    """The top level is named p50: a plan whose top level removes less than half the block parameters is refused
    before anything trains, with the figure it found."""
    from ppcl.analysis import RedundancyReport
    from ppcl.demo.run import TOP_MIN_REMOVED, make_plan
    from ppcl.errors import ConfigError
    from ppcl.toy.teacher import ToyTeacher

    report = RedundancyReport.load(Path(__file__).parents[1] / "docs" / "example-report")
    model_config = ToyTeacher.load().transformer.config
    plan = make_plan(report, model_config, 4, "p40", 0.99)
    assert plan.param_count(model_config, "p50").block_fraction_removed >= TOP_MIN_REMOVED
    with pytest.raises(ConfigError, match="removes too little") as caught:
        make_plan(report, model_config, 1, "p40", 0.9999)
    assert "of the block parameters removed" in str(caught.value) and "%" in str(caught.value)


def test_demo_refuses_a_teacher_inside_its_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Outputs are never inputs: a re-run replaces the demo's sub-folders, so a teacher inside --out is refused."""
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), "--teacher", str(out / "depth")]) == 2
    assert "the output overlaps an input" in capsys.readouterr().err
    assert not out.exists()


def test_demo_records_its_teacher(demo_out: Path) -> None:
    """results.json names the teacher the demo ran on (the committed one by default) and its size."""
    teacher = json.loads((demo_out / "results.json").read_text())["teacher"]
    assert teacher["folder"] == "committed" and teacher["config"]["num_layers"] == 16
