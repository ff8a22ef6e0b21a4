"""The bad-input catalogue (issue 7): every user mistake ends in a PPCLError of the right class, with a message that
says what was expected, what was found and how to fix it, and leaves no partial output behind.

docs/errors.md lists these cases, one row per test.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ppcl.addon import ADDON_FILE, FORMAT_VERSION, WEIGHTS_FILE, PruningAddon
from ppcl.arch import get_spec
from ppcl.cli.main import main
from ppcl.data.calibration import CalibrationSet, assemble
from ppcl.errors import (
    AddonMismatchError,
    ArtefactError,
    ConfigError,
    PPCLError,
    UnsupportedModelError,
)
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from ppcl.runtime import apply_addon, load_merged, merge, set_level
from tiny_models import build_tiny, two_span_plan


# ----------------------------------------------------------------------------------------------------------- helpers
def check_error(err: pytest.ExceptionInfo[BaseException], cls: type[PPCLError], *words: str) -> str:
    """The error is exactly a ``cls`` (or subclass) in the PPCLError format, mentioning ``words``."""
    assert isinstance(err.value, cls), f"{type(err.value).__name__} is not a {cls.__name__}: {err.value}"
    text = str(err.value)
    for part in ("Expected:", "Found:", "Fix:"):
        assert part in text, f"{part!r} missing from: {text}"
    for word in words:
        assert word in text, f"{word!r} missing from: {text}"
    return text


def check_cli_error(capsys: pytest.CaptureFixture[str], code: int, *words: str) -> str:
    """The CLI returned 2 and printed one PPCLError line."""
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ppcl: error:") and len(err.splitlines()) == 1, err
    for part in ("Expected:", "Found:", "Fix:", *words):
        assert part in err, f"{part!r} missing from: {err}"
    return err


def no_partial_output(root: Path, *outputs: Path) -> None:
    """None of ``outputs`` exists and no ``*.tmp`` file or folder is left anywhere under ``root``."""
    for out in outputs:
        assert not out.exists(), f"partial output left at {out}"
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert not leftovers, f"temporary files left: {leftovers}"


def plan_json(model: nn.Module) -> dict:
    data = two_span_plan(model).to_json()
    for rep in data["replacements"]:
        rep.pop("inclusive", None)  # the tests edit start/stop only
    return data


def write_plan(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(scope="module")
def qwen() -> nn.Module:
    return build_tiny("qwenimage").model


@pytest.fixture(scope="module")
def saved_addon(tmp_path_factory: pytest.TempPathFactory, qwen: nn.Module) -> Path:
    addon = PruningAddon.from_plan(qwen, two_span_plan(qwen))
    return addon.save_pretrained(tmp_path_factory.mktemp("addon") / "addon")


@pytest.fixture
def addon_copy(saved_addon: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_addon, tmp_path / "addon"))


def _calibration(model: nn.Module) -> CalibrationSet:
    case_inputs = [build_tiny("qwenimage").make_inputs(seed) for seed in range(2)]
    return assemble(get_spec(model), model, case_inputs, {"source": "test"})


@pytest.fixture(scope="module")
def saved_calibration(tmp_path_factory: pytest.TempPathFactory, qwen: nn.Module) -> Path:
    return _calibration(qwen).save(tmp_path_factory.mktemp("cal") / "cal")


@pytest.fixture
def calibration_copy(saved_calibration: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_calibration, tmp_path / "cal"))


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory: pytest.TempPathFactory, qwen: nn.Module) -> Path:
    from ppcl.analysis import AnalysisConfig, analyze

    report = analyze(qwen, _calibration(qwen), AnalysisConfig(batch_size=4, protect_first=1, protect_last=1))
    return report.save(tmp_path_factory.mktemp("report") / "report")


# ---------------------------------------------------------------------------------------------------------- plans
def test_plan_malformed_json(tmp_path: Path) -> None:
    path = write_plan(tmp_path, '{"arch": "qwenimage", "levels": [')
    with pytest.raises(ArtefactError) as err:
        PruningPlan.load(path)
    check_error(err, ArtefactError, "JSON")


def test_plan_malformed_json_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, "not json at all")
    check_cli_error(capsys, main(["-q", "plan", "--validate", str(path)]))


def test_plan_field_of_wrong_type(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["stack_sizes"] = "six"
    with pytest.raises(ArtefactError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ArtefactError, "stack_sizes")


def test_plan_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError) as err:
        PruningPlan.load(tmp_path / "nowhere")
    check_error(err, ArtefactError)


def test_plan_overlapping_spans_in_a_level(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["replacements"].append(DepthReplacement(Span(2, 4)).to_json())
    data["levels"].append({"name": "c", "replacements": ["depth:1-3", "depth:2-4"]})
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError, "overlap", "level c")


def test_plan_span_out_of_range(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["replacements"][1]["start"], data["replacements"][1]["stop"] = 4, 9
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError)


def test_plan_span_covers_protected_blocks(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["replacements"][0]["start"] = 0  # block 0 is protected (protect_first=1)
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError, "protected")


def test_plan_span_crosses_the_flux_double_single_boundary() -> None:
    flux = build_tiny("flux").model  # 3 double-stream blocks then 3 single-stream blocks
    spec = get_spec(flux)
    rep = DepthReplacement(Span(2, 4))
    plan = PruningPlan(
        spec.name,
        type(flux).__name__,
        tuple(spec.stack_sizes(flux)),
        [rep],
        [Level("a", (rep.id,))],
        protect_first=1,
        protect_last=1,
    )
    with pytest.raises(ConfigError) as err:
        plan.validate()
    check_error(err, ConfigError, "single_transformer_blocks")


def test_plan_span_of_one_block(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["replacements"][0]["stop"] = 2  # [1:2] is one block: nothing to replace it with
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError)


def test_plan_duplicate_level_names(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["levels"][1]["name"] = "a"
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError, "'a'")


def test_plan_level_with_unknown_replacement(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["levels"][0]["replacements"] = ["depth:7-9"]
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError, "depth:7-9")


def test_plan_save_under_a_regular_file(tmp_path: Path, qwen: nn.Module) -> None:
    blocker = tmp_path / "some_file"
    blocker.write_text("x")
    with pytest.raises(ArtefactError) as err:
        two_span_plan(qwen).save(blocker / "plan")
    check_error(err, ArtefactError)
    no_partial_output(tmp_path, blocker / "plan")


# --------------------------------------------------------------------------------------------------- level names
@pytest.mark.parametrize("surface", ["plan.level", "set_level", "merge"])
def test_unknown_level_name(surface: str) -> None:
    model = build_tiny("qwenimage").model
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    with pytest.raises(ConfigError) as err:
        if surface == "plan.level":
            addon.plan.level("p99")
        elif surface == "set_level":
            apply_addon(model, addon)
            set_level(model, "p99")
        else:
            merge(model, addon, "p99")
    check_error(err, ConfigError, "p99")


def test_merge_unknown_level_cli(
    addon_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ppcl.cli.merge as cli_merge

    monkeypatch.setattr(cli_merge, "load_model", lambda args: build_tiny("qwenimage").model)
    out = tmp_path / "merged"
    code = main(["-q", "merge", "--addon", str(addon_copy), "--level", "p99", "--out", str(out)])
    check_cli_error(capsys, code, "p99")
    no_partial_output(tmp_path, out)


# -------------------------------------------------------------------------------------------------------- add-ons
def test_addon_for_another_base_config(addon_copy: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    base = build_tiny("qwenimage").model
    other = QwenImageTransformer2DModel.from_config({**base.config, "joint_attention_dim": 24})
    with pytest.raises(AddonMismatchError) as err:
        PruningAddon.from_pretrained(addon_copy, other)
    check_error(err, AddonMismatchError, "joint_attention_dim")


def test_addon_for_another_depth(addon_copy: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    base = build_tiny("qwenimage").model
    deeper = QwenImageTransformer2DModel.from_config({**base.config, "num_layers": 8})
    with pytest.raises(AddonMismatchError) as err:
        PruningAddon.from_pretrained(addon_copy, deeper)
    check_error(err, AddonMismatchError, "stack_sizes")


def test_addon_for_another_arch(addon_copy: Path) -> None:
    with pytest.raises(AddonMismatchError) as err:
        PruningAddon.from_pretrained(addon_copy, build_tiny("sd3").model)
    check_error(err, AddonMismatchError, "arch")


def test_addon_of_a_newer_format_version(addon_copy: Path, qwen: nn.Module) -> None:
    manifest = json.loads((addon_copy / ADDON_FILE).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (addon_copy / ADDON_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, "upgrade ppcl")


def test_addon_manifest_malformed(addon_copy: Path, qwen: nn.Module) -> None:
    (addon_copy / ADDON_FILE).write_text('{"format": "ppcl.pruning_addon", ')
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, "JSON")


@pytest.mark.parametrize("drop", ["plan", "fingerprint"])
def test_addon_manifest_missing_a_section(addon_copy: Path, qwen: nn.Module, drop: str) -> None:
    manifest = json.loads((addon_copy / ADDON_FILE).read_text())
    del manifest[drop]
    (addon_copy / ADDON_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, drop)


def test_addon_truncated_weights(addon_copy: Path, qwen: nn.Module) -> None:
    weights = addon_copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, "truncated or corrupt")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_addon_manifest_weights_mismatch(addon_copy: Path, qwen: nn.Module, change: str) -> None:
    tensors = load_file(str(addon_copy / WEIGHTS_FILE))
    if change == "missing":
        name = min(tensors)
        del tensors[name]
    else:
        name = "depth_9_9.extra"
        tensors[name] = torch.zeros(1)
    save_file(tensors, str(addon_copy / WEIGHTS_FILE))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, name)


def test_addon_applied_twice() -> None:
    model = build_tiny("qwenimage").model
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    apply_addon(model, addon, "a")
    with pytest.raises(ConfigError) as err:
        apply_addon(model, addon, "b")
    check_error(err, ConfigError, "already applied")


def test_addon_save_under_a_regular_file(tmp_path: Path, qwen: nn.Module) -> None:
    blocker = tmp_path / "some_file"
    blocker.write_text("x")
    addon = PruningAddon.from_plan(qwen, two_span_plan(qwen))
    with pytest.raises(ArtefactError) as err:
        addon.save_pretrained(blocker / "out")
    check_error(err, ArtefactError)
    no_partial_output(tmp_path, blocker / "out")


def test_calibration_truncated_weights(calibration_copy: Path) -> None:
    weights = calibration_copy / "calibration.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ArtefactError) as err:
        CalibrationSet.load(calibration_copy)
    check_error(err, ArtefactError, "truncated or corrupt")


def test_calibration_content_hash_mismatch(calibration_copy: Path) -> None:
    weights = calibration_copy / "calibration.safetensors"
    tensors = load_file(str(weights))
    tensors["timestep"] = tensors["timestep"] + 0.5
    save_file(tensors, str(weights))
    with pytest.raises(ArtefactError) as err:
        CalibrationSet.load(calibration_copy)
    check_error(err, ArtefactError, "content")


def test_calibration_from_another_model(saved_calibration: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    base = build_tiny("qwenimage").model
    other = QwenImageTransformer2DModel.from_config({**base.config, "num_layers": 4})
    with pytest.raises(ArtefactError) as err:
        CalibrationSet.load(saved_calibration).check_model(other)
    check_error(err, ArtefactError, "another model")


def test_calibration_manifest_missing_fields(calibration_copy: Path) -> None:
    manifest = json.loads((calibration_copy / "calibration.json").read_text())
    del manifest["arch"]
    (calibration_copy / "calibration.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError) as err:
        CalibrationSet.load(calibration_copy)
    check_error(err, ArtefactError, "arch")


def test_calibration_save_under_a_regular_file(tmp_path: Path, qwen: nn.Module) -> None:
    blocker = tmp_path / "some_file"
    blocker.write_text("x")
    with pytest.raises(ArtefactError) as err:
        _calibration(qwen).save(blocker / "cal")
    check_error(err, ArtefactError)
    no_partial_output(tmp_path, blocker / "cal")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_calibrate_cli_empty_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    out = tmp_path / "cal"
    code = main(["-q", "calibrate", "--out", str(out), "--prompts", str(prompts), "--steps", "2", "--timesteps", "1"])
    check_cli_error(capsys, code, "empty")
    no_partial_output(tmp_path, out)


def test_calibrate_empty_prompt_list() -> None:
    from ppcl.toy.calibrate import calibrate_toy_prompts
    from ppcl.toy.teacher import ToyTeacher

    with pytest.raises(ConfigError) as err:
        calibrate_toy_prompts(ToyTeacher.load(), [], (0,))
    check_error(err, ConfigError, "0 prompts")


def test_calibrate_cli_unknown_words_in_caption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na purple blob\n")
    out = tmp_path / "cal"
    code = main(["-q", "calibrate", "--out", str(out), "--prompts", str(prompts), "--steps", "2", "--timesteps", "1"])
    check_cli_error(capsys, code, "purple", "blob")
    no_partial_output(tmp_path, out)


def test_toy_caption_unknown_words() -> None:
    from ppcl.toy.teacher import ToyTeacher

    with pytest.raises(ConfigError) as err:
        ToyTeacher.load().tokenizer.encode_one("a red dodecahedron")
    check_error(err, ConfigError, "dodecahedron")


# ------------------------------------------------------------------------------------------- models and arguments
class UNet2DConditionModel(nn.Module):
    """Looks like a diffusers UNet by name: not a supported transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3)


@pytest.mark.parametrize("model", [nn.Linear(2, 2), UNet2DConditionModel()], ids=["plain_module", "unet_like"])
def test_unsupported_model_class(model: nn.Module) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        get_spec(model)
    check_error(err, UnsupportedModelError, type(model).__name__)


def test_unsupported_model_for_an_addon(saved_addon: Path) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        PruningAddon.from_pretrained(saved_addon, UNet2DConditionModel())
    check_error(err, UnsupportedModelError, "UNet2DConditionModel")


def test_wrong_dtype_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--dtype`` lists its choices, so argparse refuses a wrong one before anything loads (exit 2, one line)."""
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as info:
        main(["-q", "merge", "--addon", str(tmp_path / "a"), "--level", "a", "--out", str(out), "--dtype", "fp8"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid choice: 'fp8'" in err and "bf16" in err and "Traceback" not in err
    no_partial_output(tmp_path, out)


def test_wrong_dtype_string_api() -> None:
    from ppcl.data.loading import parse_dtype

    with pytest.raises(ConfigError) as err:
        parse_dtype("fp8")
    check_error(err, ConfigError, "fp8", "bf16")


# ------------------------------------------------------------------------------------------------- merged models
@pytest.fixture
def merged_folder(tmp_path: Path) -> Path:
    """A depth-merged tiny model folder plus a width-style record, to be broken by the tests."""
    from ppcl.runtime.merge_width import MERGED_FILE

    model = build_tiny("qwenimage").model
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    folder = tmp_path / "merged"
    merge(model, addon, "a").save_pretrained(str(folder))
    record = {
        "format": "ppcl.merged_width",
        "format_version": 1,
        "model_class": type(model).__name__,
        "level": "a",
        "substitutions": [],
        "projection_dtype": "float32",
    }
    (folder / MERGED_FILE).write_text(json.dumps(record))
    return folder


def test_load_merged_without_record(merged_folder: Path, tmp_path: Path) -> None:
    """Without ppcl_merged.json the folder is a depth-only merge: it loads as the stock model; no model at all is
    refused with the file it looked for."""
    from ppcl.runtime.merge_width import MERGED_FILE

    (merged_folder / MERGED_FILE).unlink()
    assert len(load_merged(merged_folder).transformer_blocks) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtefactError) as err:
        load_merged(tmp_path / "empty")
    check_error(err, ArtefactError, "config.json")


def test_load_merged_corrupt_record(merged_folder: Path) -> None:
    from ppcl.runtime.merge_width import MERGED_FILE

    (merged_folder / MERGED_FILE).write_text("{ broken")
    with pytest.raises(ArtefactError) as err:
        load_merged(merged_folder)
    check_error(err, ArtefactError, "JSON")


@pytest.mark.parametrize("drop", ["model_class", "substitutions"])
def test_load_merged_record_missing_pieces(merged_folder: Path, drop: str) -> None:
    from ppcl.runtime.merge_width import MERGED_FILE

    record = json.loads((merged_folder / MERGED_FILE).read_text())
    if "format" not in record or record.get("format") != "ppcl.merged_width":
        pytest.skip("record format differs")
    del record[drop]
    (merged_folder / MERGED_FILE).write_text(json.dumps(record))
    with pytest.raises(ArtefactError) as err:
        load_merged(merged_folder)
    check_error(err, ArtefactError, drop)


def test_load_merged_truncated_weights(merged_folder: Path) -> None:
    weights = next(merged_folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ArtefactError) as err:
        load_merged(merged_folder)
    check_error(err, ArtefactError, "truncated or corrupt")


# ----------------------------------------------------------------------------------------- analysis and the CLI
def test_analyze_missing_calibration_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = main(["-q", "analyze", "--calibration", str(tmp_path / "nope"), "--out", str(out)])
    check_cli_error(capsys, code, "calibration")
    no_partial_output(tmp_path, out)


def test_report_with_another_model_config(saved_report: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    from ppcl.analysis import RedundancyReport
    from ppcl.plan import plan_from_report

    base = build_tiny("qwenimage").model
    other = QwenImageTransformer2DModel.from_config({**base.config, "num_layers": 8})
    with pytest.raises(ArtefactError) as err:
        plan_from_report(RedundancyReport.load(saved_report), other.config)
    check_error(err, ArtefactError, "another model config")


def test_report_manifest_missing_fields(saved_report: Path, tmp_path: Path) -> None:
    from ppcl.analysis import RedundancyReport

    folder = Path(shutil.copytree(saved_report, tmp_path / "report"))
    manifest = json.loads((folder / "report.json").read_text())
    del manifest["intervals"]
    (folder / "report.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError) as err:
        RedundancyReport.load(folder)
    check_error(err, ArtefactError, "intervals")


@pytest.mark.parametrize("targets", ["abc", "0.25,,x", ","])
def test_plan_cli_unparsable_targets(
    saved_report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], targets: str
) -> None:
    out = tmp_path / "plan"
    code = main(["-q", "plan", "--report", str(saved_report), "--out", str(out), "--targets", targets])
    check_cli_error(capsys, code, "targets")
    no_partial_output(tmp_path, out)


@pytest.mark.parametrize("factor", ["0.5", "-1", "nan"])
def test_plan_cli_bad_guard_factor(tmp_path: Path, capsys: pytest.CaptureFixture[str], factor: str) -> None:
    # The factor is checked before the report is read: a missing report folder is not what fails.
    out = tmp_path / "plan"
    code = main(["-q", "plan", "--report", str(tmp_path / "no-report"), "--out", str(out), "--guard-factor", factor])
    check_cli_error(capsys, code, "budget guard factor", "--guard-factor")
    no_partial_output(tmp_path, out)


def test_inspect_a_non_artefact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    check_cli_error(capsys, main(["-q", "inspect", str(tmp_path)]), "not a ppcl artefact")


def test_inspect_a_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_cli_error(capsys, main(["-q", "inspect", str(tmp_path / "nothing")]))


# ------------------------------------------------------------------------------------ output safety (issue 14, item 1)
def user_folder(root: Path) -> Path:
    """A folder of the user's own (ppcl did not write it); the tests check it survives untouched."""
    folder = root / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return folder


def untouched(folder: Path) -> bool:
    names = sorted(p.name for p in folder.iterdir())
    return names == ["notes.txt"] and (folder / "notes.txt").read_text() == "my notes"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


TOY_CALIBRATE = ["--num-prompts", "2", "--timesteps", "1", "--steps", "2"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_calibrate_cli_out_is_a_user_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: list[str]
) -> None:
    mine = user_folder(tmp_path)
    code = main(["-q", "calibrate", "--out", str(mine), *TOY_CALIBRATE, *overwrite])
    check_cli_error(capsys, code, "did not write", "ppcl calibration set")
    assert untouched(mine)


def test_calibrate_cli_replaces_a_calibration_set_only_with_overwrite(
    calibration_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree(calibration_copy)
    check_cli_error(
        capsys,
        main(["-q", "calibrate", "--out", str(calibration_copy), *TOY_CALIBRATE]),
        "already holds a ppcl calibration set",
        "--overwrite",
    )
    assert tree(calibration_copy) == before
    assert main(["-q", "calibrate", "--out", str(calibration_copy), *TOY_CALIBRATE, "--overwrite"]) == 0
    assert tree(calibration_copy) != before and CalibrationSet.load(calibration_copy).arch == "qwenimage"


@pytest.mark.parametrize("where", ["same", "parent"])
def test_analyze_cli_out_overlaps_its_calibration(
    calibration_copy: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    before = tree(calibration_copy)
    out = calibration_copy if where == "same" else calibration_copy.parent
    code = main(["-q", "analyze", "--calibration", str(calibration_copy), "--out", str(out), "--overwrite"])
    check_cli_error(capsys, code, "overlaps an input")
    assert tree(calibration_copy) == before


@pytest.mark.parametrize("target", ["addon", "model"])
def test_merge_cli_out_is_an_input(
    addon_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    model = user_folder(tmp_path)  # stands for the user's base model folder: never read, the check comes first
    out = addon_copy if target == "addon" else model
    before = tree(addon_copy)
    code = main(
        [
            "-q",
            "merge",
            "--addon",
            str(addon_copy),
            "--level",
            "a",
            "--model",
            str(model),
            "--out",
            str(out),
            "--overwrite",
        ]
    )
    check_cli_error(capsys, code, "overlaps an input")
    assert tree(addon_copy) == before and untouched(model)


def test_eval_cli_out_inside_the_addon(addon_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(addon_copy)
    code = main(["-q", "eval", "--addon", str(addon_copy), "--out", str(addon_copy / ADDON_FILE), "--overwrite"])
    check_cli_error(capsys, code, "overlaps an input", "lies inside")
    assert tree(addon_copy) == before


def test_plan_cli_out_inside_the_report(saved_report: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(saved_report)
    code = main(["-q", "plan", "--report", str(saved_report), "--out", str(saved_report / "plan2")])
    check_cli_error(capsys, code, "overlaps an input")
    assert tree(saved_report) == before


def test_save_api_replaces_an_artefact_only_with_overwrite(calibration_copy: Path, qwen: nn.Module) -> None:
    before = tree(calibration_copy)
    calibration = CalibrationSet.load(calibration_copy)
    with pytest.raises(ConfigError) as err:
        calibration.save(calibration_copy)
    check_error(err, ConfigError, "already holds a ppcl calibration set", "overwrite=True")
    assert tree(calibration_copy) == before
    calibration.save(calibration_copy, overwrite=True)
    assert CalibrationSet.load(calibration_copy).content_hash == calibration.content_hash


def test_save_api_never_replaces_another_kind(calibration_copy: Path, qwen: nn.Module) -> None:
    before = tree(calibration_copy)
    with pytest.raises(ConfigError) as err:
        PruningAddon.from_plan(qwen, two_span_plan(qwen)).save_pretrained(calibration_copy, overwrite=True)
    check_error(err, ConfigError, "did not write", "ppcl add-on")
    assert tree(calibration_copy) == before


def test_save_api_refuses_a_symlinked_output(saved_report: Path, tmp_path: Path) -> None:
    from ppcl.analysis import RedundancyReport

    link = tmp_path / "link"
    link.symlink_to(user_folder(tmp_path), target_is_directory=True)
    with pytest.raises(ConfigError) as err:
        RedundancyReport.load(saved_report).save(link, overwrite=True)
    check_error(err, ConfigError, "symlink")
    assert untouched(tmp_path / "mine")


def test_save_api_writes_into_an_empty_folder(tmp_path: Path, qwen: nn.Module) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    PruningAddon.from_plan(qwen, two_span_plan(qwen)).save_pretrained(empty)
    assert (empty / ADDON_FILE).is_file()


PLAN_DIR = str(Path(__file__).parents[1] / "docs" / "example-report" / "plan")


def distill_cli(out: Path, *extra: str) -> int:
    return main(
        [
            "-q",
            "distill",
            "--stage",
            "depth",
            "--plan",
            PLAN_DIR,
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "0",
            *extra,
        ]
    )


def test_distill_cli_out_is_a_user_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = user_folder(tmp_path)
    check_cli_error(capsys, distill_cli(mine, "--overwrite"), "not a ppcl run")
    assert untouched(mine)


def test_distill_cli_second_run_needs_resume_or_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert distill_cli(out) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("my notes")  # a user's file inside a run folder is never removed
    before = tree(out)
    check_cli_error(capsys, distill_cli(out), "already holds a distillation run", "--resume", "--overwrite")
    assert tree(out) == before
    assert distill_cli(out, "--overwrite", "--seed", "1") == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "addon" / ADDON_FILE).is_file()
    assert tree(out)["addon/" + WEIGHTS_FILE] != before["addon/" + WEIGHTS_FILE]


@pytest.mark.parametrize("entry", ["metrics.jsonl", "checkpoint/trainer_state.json"])
def test_distill_cli_refuses_a_run_folder_entry_that_is_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    """Issue 14 (containment): a run appends to metrics.jsonl and reads its checkpoint; a symlink planted among them
    would make it write to or read from a file outside --out."""
    out = tmp_path / "run"
    assert distill_cli(out) == 0
    capsys.readouterr()
    victim = tmp_path / "victim.txt"
    victim.write_bytes((out / entry).read_bytes())
    (out / entry).unlink()
    (out / entry).symlink_to(victim)
    before = victim.read_bytes()
    check_cli_error(capsys, distill_cli(out, "--resume", "--steps", "3"), "symlink ppcl did not create")
    assert victim.read_bytes() == before


def test_distill_cli_disk_full_while_appending_the_metrics_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = Path.open

    def full(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        if self.name == "metrics.jsonl" and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", full)
    monkeypatch.setenv("PPCL_NO_PROGRESS", "1")  # the bar a terminal clears would precede the line in capsys
    out = tmp_path / "run"
    check_cli_error(capsys, distill_cli(out), "cannot write the metrics log", "No space left", "--resume")
    assert not (out / ".ppcl-run.lock").exists() and not (out / "addon").exists()


def test_demo_out_is_a_user_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = user_folder(tmp_path)
    check_cli_error(capsys, main(["-q", "demo", "--fast", "--out", str(mine)]), "no demo wrote")
    assert untouched(mine)


def test_toy_eval_cli_never_replaces_a_foreign_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('mine')")
    code = main(["-q", "toy", "eval", "--ground-truth", "--per-category", "1", "--out", str(script), "--overwrite"])
    check_cli_error(capsys, code, "not a file ppcl writes", "a .py file")
    assert script.read_text() == "print('mine')"


def test_toy_sample_cli_replaces_an_image_only_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "grid.png"
    image.write_bytes(b"not really a png")
    args = ["-q", "toy", "sample", "--prompt", "a red circle", "--n", "1", "--steps", "2", "--out", str(image)]
    check_cli_error(capsys, main(args), "already exists", "--overwrite")
    assert image.read_bytes() == b"not really a png"
    assert main([*args, "--overwrite"]) == 0
    assert image.read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------- disk full, Ctrl-C, bad counts (issue 14, item 4)
def test_disk_full_while_saving_an_artefact(tmp_path: Path, qwen: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import ppcl.io

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ppcl.io, "save_file", full)
    out = tmp_path / "cal"
    with pytest.raises(ArtefactError) as err:
        _calibration(qwen).save(out)
    check_error(err, ArtefactError, "cannot write the output", "No space left on device")
    no_partial_output(tmp_path, out)


def test_disk_full_while_writing_a_json_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import ppcl.io

    path = tmp_path / "rows.json"
    path.write_text('{"old": true}')

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ppcl.io.os, "replace", full)
    with pytest.raises(ArtefactError) as err:
        ppcl.io.write_json({"new": True}, path)
    check_error(err, ArtefactError, "No space left on device")
    assert path.read_text() == '{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


@pytest.mark.parametrize("writer", ["json", "text", "png"])
def test_a_planted_tmp_symlink_is_not_followed(tmp_path: Path, writer: str) -> None:
    import numpy as np

    from ppcl.io import write_json, write_text
    from ppcl.toy.images import save_png

    name, write = {
        "json": ("rows.json", lambda p: write_json({"a": 1}, p)),
        "text": ("report.html", lambda p: write_text("<html></html>", p)),
        "png": ("grid.png", lambda p: save_png(np.zeros((4, 4, 3), dtype=np.uint8), p)),
    }[writer]
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    (tmp_path / f"{name}.tmp").symlink_to(victim)  # the old fixed temp name
    write(tmp_path / name)
    assert victim.read_text() == "user data" and (tmp_path / name).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{name}.tmp", "victim.txt"])  # no temp left


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import ppcl.cli.plan as cli_plan

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_plan, "_run", interrupted)
    assert main(["-q", "plan", "--validate", "x"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("ppcl: interrupted") and len(err.splitlines()) == 1 and "--resume" in err


def test_calibrate_cli_prompt_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe latin-1 text\n")
    out = tmp_path / "cal"
    check_cli_error(
        capsys, main(["-q", "calibrate", "--prompts", str(prompts), "--out", str(out)]), "not UTF-8", "byte 13"
    )
    no_partial_output(tmp_path, out)


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--num-prompts", "0"],
        ["calibrate", "--timesteps", "-1"],
        ["calibrate", "--steps", "0"],
        ["eval", "--addon", "ADDON", "--repeats", "0"],
        ["eval", "--addon", "ADDON", "--batches", "0"],
        ["eval", "--addon", "ADDON", "--batch-size", "0"],
        ["eval", "--addon", "ADDON", "--per-category", "-2"],
    ],
)
def test_zero_or_negative_counts(
    argv: list[str], addon_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(addon_copy) if a == "ADDON" else a for a in argv]
    out = tmp_path / ("out.json" if argv[0] == "eval" else "cal")
    check_cli_error(capsys, main(["-q", *argv, "--out", str(out)]), "must be positive")
    no_partial_output(tmp_path, out)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["analyze", "--calibration", "MISSING", "--out", "OUT", "--batch-size", "0"], "--batch-size must be positive"),
        (["analyze", "--calibration", "MISSING", "--out", "OUT", "--max-len", "0"], "--max-len must be positive"),
        (
            ["analyze", "--calibration", "MISSING", "--out", "OUT", "--cache-tokens", "-5"],
            "--cache-tokens must be positive",
        ),
        (["analyze", "--calibration", "MISSING", "--out", "OUT", "--protect-first", "-1"], "must be zero or positive"),
        (["analyze", "--calibration", "MISSING", "--out", "OUT", "--refine-steps", "-1"], "must be zero or positive"),
        (["analyze", "--calibration", "MISSING", "--out", "OUT", "--seed", "-1"], "--seed must be a valid seed"),
        (["plan", "--report", "MISSING", "--out", "OUT", "--width", "--ffn-blocks", "-1"], "--ffn-blocks must be zero"),
        (
            ["cache", "--pipeline", "MISSING", "--images", "MISSING", "--resolution", "0", "--out", "OUT"],
            "--resolution must be positive",
        ),
        (
            [
                "cache",
                "--pipeline",
                "MISSING",
                "--images",
                "MISSING",
                "--resolution",
                "16",
                "--shard-size",
                "0",
                "--out",
                "OUT",
            ],
            "--shard-size must be positive",
        ),
        (
            [
                "cache",
                "--pipeline",
                "MISSING",
                "--prompts",
                "MISSING",
                "--resolution",
                "16",
                "--seed",
                str(2**32),
                "--out",
                "OUT",
            ],
            "--seed must be a valid seed",
        ),
        (["generate", "--prompt", "a red circle", "--out", "OUT.png", "--height", "0"], "--height must be positive"),
        (["generate", "--prompt", "a red circle", "--out", "OUT.png", "--seed", "-3"], "--seed must be a valid seed"),
        (["demo", "--out", "OUT", "--depth-steps", "0"], "--depth-steps must be positive"),
        (["demo", "--out", "OUT", "--threads", "0"], "--threads must be positive"),
        (["toy", "train-teacher", "--out", "OUT", "--batch-size", "0"], "--batch-size must be positive"),
        (["toy", "train-teacher", "--out", "OUT", "--seed", "-1"], "--seed must be a valid seed"),
        (["toy", "eval", "--out", "OUT.json", "--seeds", "0"], "--seeds must be positive"),
        (["toy", "sample", "--prompt", "a red circle", "--out", "OUT.png", "--n", "0"], "--n must be positive"),
        (["toy", "sample", "--prompt", "a red circle", "--out", "OUT.png", "--steps", "0"], "--steps must be positive"),
        (["distill", "--plan", PLAN_DIR, "--out", "OUT", "--seed", "-1"], "--seed must be a valid seed"),
        (["calibrate", "--seeds", "0,-1", "--out", "OUT"], "--seeds out of range"),
    ],
)
def test_out_of_range_counts_and_seeds_in_every_verb(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14: every count flag refuses zero / negative values, every seed flag a value numpy cannot take, before
    anything loads or is written."""
    swap = {
        "MISSING": str(tmp_path / "missing"),
        "OUT": str(tmp_path / "out"),
        "OUT.png": str(tmp_path / "out.png"),
        "OUT.json": str(tmp_path / "out.json"),
    }
    check_cli_error(capsys, main(["-q", *[swap.get(a, a) for a in argv]]), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------ bounded resources (issue 14, item 7)
@pytest.mark.parametrize("sizes", [[10**9], [6, 0], [], [1] * 9])
def test_plan_with_absurd_stack_sizes(tmp_path: Path, qwen: nn.Module, sizes: list[int]) -> None:
    """A 200-byte plan declaring 1e9 blocks is refused while parsing, before validation walks any block."""
    data = plan_json(qwen)
    data["stack_sizes"] = sizes
    with pytest.raises(ArtefactError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ArtefactError, "stack_sizes", "out of range")


def test_plan_with_a_huge_span(tmp_path: Path, qwen: nn.Module) -> None:
    data = plan_json(qwen)
    data["replacements"][0]["stop"] = 10**15
    with pytest.raises(ConfigError) as err:
        PruningPlan.load(write_plan(tmp_path, data))
    check_error(err, ConfigError, "past the last block")


# ---------------------------------------------------------------------------------------- integrity (issue 14, item 6)
@pytest.mark.parametrize("change", ["drop config", "null block_shapes", "stack_sizes text", "not an object"])
def test_addon_fingerprint_incomplete(addon_copy: Path, qwen: nn.Module, change: str) -> None:
    """A fingerprint missing a field used to skip that check silently; now loading fails and names the field."""
    manifest = json.loads((addon_copy / ADDON_FILE).read_text())
    fp = manifest["fingerprint"]
    if change == "drop config":
        del fp["config"]
    elif change == "null block_shapes":
        fp["block_shapes"] = None
    elif change == "stack_sizes text":
        fp["stack_sizes"] = ["six"]
    else:
        manifest["fingerprint"] = "qwen"
    (addon_copy / ADDON_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, "fingerprint")


def test_addon_with_non_finite_weights(addon_copy: Path, qwen: nn.Module) -> None:
    weights = load_file(addon_copy / WEIGHTS_FILE)
    key = sorted(weights)[0]
    weights[key] = weights[key].clone().fill_(float("nan"))
    save_file(weights, addon_copy / WEIGHTS_FILE)
    with pytest.raises(ArtefactError) as err:
        PruningAddon.from_pretrained(addon_copy, qwen)
    check_error(err, ArtefactError, "non-finite", key)


def test_merge_cli_never_writes_a_non_finite_model(
    addon_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ppcl.cli.merge as cli_merge

    def nan_base(args: object) -> nn.Module:
        model = build_tiny("qwenimage").model
        with torch.no_grad():
            next(model.transformer_blocks[0].parameters()).fill_(float("nan"))  # a block every level keeps
        return model

    monkeypatch.setattr(cli_merge, "load_model", nan_base)
    out = tmp_path / "merged"
    code = main(["-q", "merge", "--addon", str(addon_copy), "--level", "a", "--out", str(out)])
    check_cli_error(capsys, code, "non-finite", "transformer_blocks.0")
    no_partial_output(tmp_path, out)


@pytest.mark.parametrize("damage", ["nan", "rows", "count"])
def test_calibration_inconsistent_or_not_finite(calibration_copy: Path, damage: str) -> None:
    weights = calibration_copy / "calibration.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() > 1 and not k.startswith("shared."))
    if damage == "nan":
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    elif damage == "rows":
        tensors[key] = tensors[key][:1].clone()
    if damage != "count":
        save_file(tensors, str(weights))
    else:
        manifest = json.loads((calibration_copy / "calibration.json").read_text())
        manifest["n_samples"] += 5
        (calibration_copy / "calibration.json").write_text(json.dumps(manifest))
    words = {"nan": "not finite", "rows": "disagree on the number of samples", "count": "n_samples"}[damage]
    with pytest.raises(ArtefactError) as err:
        CalibrationSet.load(calibration_copy)
    check_error(err, ArtefactError, words)


@pytest.mark.parametrize(("device", "words"), [("gpu", "unknown --device"), ("cuda:99", "not available")])
def test_bad_device(addon_copy: Path, capsys: pytest.CaptureFixture[str], device: str, words: str) -> None:
    code = main(["-q", "eval", "--addon", str(addon_copy), "--device", device, "--no-shapes-eval"])
    check_cli_error(capsys, code, words, device)


@pytest.mark.parametrize("drop", ["n_samples", "content_hash"])
def test_inspect_an_incomplete_manifest(calibration_copy: Path, capsys: pytest.CaptureFixture[str], drop: str) -> None:
    manifest = json.loads((calibration_copy / "calibration.json").read_text())
    del manifest[drop]
    (calibration_copy / "calibration.json").write_text(json.dumps(manifest))
    check_cli_error(capsys, main(["-q", "inspect", str(calibration_copy)]), "manifest is incomplete", drop)


def test_report_matrices_from_another_report(saved_report: Path, tmp_path: Path) -> None:
    from ppcl.analysis import RedundancyReport

    folder = Path(shutil.copytree(saved_report, tmp_path / "report"))
    tensors = load_file(folder / "report.safetensors")
    tensors["cka.used"] = tensors["cka.used"].clone() * 0.5  # values a plan would silently be built from
    save_file(tensors, folder / "report.safetensors")
    with pytest.raises(ArtefactError) as err:
        RedundancyReport.load(folder)
    check_error(err, ArtefactError, "do not belong to its manifest")


def test_toy_train_teacher_out_is_a_user_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = user_folder(tmp_path)
    code = main(["-q", "toy", "train-teacher", "--out", str(mine), "--steps", "1", "--layers", "2"])
    check_cli_error(capsys, code, "not a toy-teacher run")
    assert untouched(mine)
