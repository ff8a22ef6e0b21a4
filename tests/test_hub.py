"""The Hub, offline-first (issue 16): Hub ids resolve through a pre-filled local Hugging Face cache, never the network;
``push_to_hub`` uploads the add-on folder with a card whose snippet loads it by id; merged folders get a card too.

The cache is filled by hand in the layout ``huggingface_hub`` reads (``models--owner--name/refs/main`` →
``snapshots/<commit>/``), and every test that reads it also makes any network call fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

import ppcl
from ppcl.addon import PruningAddon
from ppcl.cli.main import main
from ppcl.errors import ArtefactError
from ppcl.runtime import active_level, load_merged, merge, save_merged
from tiny_models import build_tiny, two_span_plan
from tiny_pipelines import build_flux

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _prefill(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put ``folder`` into ``cache`` as the ``main`` snapshot of model repo ``repo_id``; returns the snapshot."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    snapshot = storage / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh default Hugging Face cache, and no network: any Hub API call fails the test."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ppcl reached for the network")

    for name in ("repo_info", "model_info", "list_repo_tree", "create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, no_network)
    return cache


def _addon_folder(tmp_path: Path, model: torch.nn.Module) -> tuple[PruningAddon, Path]:
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(0.01)
    return addon, addon.save_pretrained(tmp_path / "addon")


def test_an_addon_loads_by_hub_id_from_the_cache(offline: Path, tmp_path: Path) -> None:
    model = build_tiny("flux").model
    addon, folder = _addon_folder(tmp_path, model)
    _prefill(offline, "ppcl-tests/tiny-addon", folder)
    loaded = PruningAddon.from_pretrained("ppcl-tests/tiny-addon", model)
    assert loaded.state_dict().keys() == addon.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in addon.state_dict().items())
    other = tmp_path / "other-cache"
    _prefill(other, "ppcl-tests/tiny-addon", folder)
    assert PruningAddon.from_pretrained("ppcl-tests/tiny-addon", model, cache_dir=other).plan == addon.plan


def test_a_hub_id_not_in_the_cache_is_refused_without_the_network(offline: Path) -> None:
    model = build_tiny("flux").model
    with pytest.raises(ArtefactError, match="hf download ppcl-tests/missing") as err:
        PruningAddon.from_pretrained("ppcl-tests/missing", model)
    assert "no snapshot of the Hub repo" in str(err.value)
    with pytest.raises(ArtefactError, match="not spelled like a Hub id"):
        PruningAddon.from_pretrained("./no/such/folder", model)


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(
    offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny("flux").model
    _, folder = _addon_folder(tmp_path, model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me").mkdir()
    shutil.copytree(folder, tmp_path / "me" / "addon")  # ./me/addon exists: no cache lookup (the cache is empty)
    assert PruningAddon.from_pretrained("me/addon", model).plan.levels[0].name == "a"


def test_load_pipeline_and_the_cli_take_hub_ids(offline: Path, tmp_path: Path) -> None:
    pipe_snapshot = _prefill(offline, "ppcl-tests/tiny-flux", build_flux(tmp_path / "flux"))
    base = ppcl.load_pipeline(pipe_snapshot).transformer
    addon, folder = _addon_folder(tmp_path, base)
    _prefill(offline, "ppcl-tests/tiny-flux-ppcl", folder)

    pipe = ppcl.load_pipeline("ppcl-tests/tiny-flux", "ppcl-tests/tiny-flux-ppcl", level="b")
    assert active_level(pipe.transformer) == "b"
    out = tmp_path / "merged"
    code = main(["merge", "--model", "ppcl-tests/tiny-flux", "--addon", "ppcl-tests/tiny-flux-ppcl", "--level", "b",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    card = ModelCard.load(out / "README.md")
    # The base was a cache snapshot: the card names its Hub repo, never the snapshot's local path.
    assert card.data.base_model == "ppcl-tests/tiny-flux" and card.data.library_name == "diffusers"
    assert str(offline) not in card.content and "| `transformer_blocks` | 3 | 2 |" in card.content
    _prefill(offline, "ppcl-tests/tiny-flux-p40", out)
    small = load_merged("ppcl-tests/tiny-flux-p40")
    assert len(small.transformer_blocks) == 2 and small.ppcl_block_map.base_model == "ppcl-tests/tiny-flux"
    merged_pipe = ppcl.load_pipeline("ppcl-tests/tiny-flux", "ppcl-tests/tiny-flux-p40")
    assert len(merged_pipe.transformer.single_transformer_blocks) == 2
    assert main(["merge", "--model", "ppcl-tests/absent", "--addon", str(folder), "--level", "b",
                 "--out", str(tmp_path / "m2")]) == 2  # fmt: skip


def test_push_to_hub_uploads_the_folder_with_a_card_that_loads_it_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny("qwenimage").model
    addon, _ = _addon_folder(tmp_path, model)
    calls: dict[str, Any] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        calls["create"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: Any, **kwargs: Any) -> Any:
        calls["upload"] = kwargs
        shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")  # the temporary folder goes away afterwards
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = addon.push_to_hub("me/tiny-qwen-ppcl", private=True, license="apache-2.0")
    assert url == "https://huggingface.co/me/tiny-qwen-ppcl/commit/1"
    assert calls["create"] == ("me/tiny-qwen-ppcl", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"]["repo_id"] == "me/tiny-qwen-ppcl" and calls["upload"]["repo_type"] == "model"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "ppcl_addon.json", "ppcl_addon.safetensors"]
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "ppcl"
    assert "PruningAddon.from_pretrained('me/tiny-qwen-ppcl', pipe.transformer, local_files_only=False)" in card.text
    assert PruningAddon.from_pretrained(uploaded, model).plan == addon.plan


def test_the_cards_snippet_runs(offline: Path, tmp_path: Path) -> None:
    """The pushed card's Python, with the base and the add-on served from the pre-filled cache."""
    import re

    folder = build_flux(tmp_path / "flux")
    base = ppcl.load_pipeline(folder).transformer
    addon, addon_folder = _addon_folder(tmp_path, base)
    _prefill(offline, "me/tiny-flux-ppcl", addon_folder)
    from ppcl.addon.card import model_card

    card = model_card(addon.manifest(), repo_id="me/tiny-flux-ppcl")
    code = re.search(r"```python\n(.*?)```", card.split("## How to load", 1)[1], re.DOTALL).group(1)
    code = (
        code.replace("'path/to/the/base/pipeline'", repr(str(folder)))
        .replace("local_files_only=False", "local_files_only=True")  # served from the cache here
        .replace("torch.bfloat16", "torch.float32")
        .replace('pipe("a red fox in the snow")', 'pipe("a red fox", num_inference_steps=1, height=16, width=16)')
    )
    scope: dict[str, Any] = {}
    exec(compile(code, "card", "exec"), scope)  # noqa: S102 - our own card
    assert active_level(scope["pipe"].transformer) == "a" and scope["image"].size == (16, 16)


def test_merged_folders_get_a_card(tmp_path: Path) -> None:
    model = build_tiny("sd3").model
    addon, _ = _addon_folder(tmp_path, model)
    folder = save_merged(merge(model, addon, "b"), tmp_path / "merged")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None  # built from scratch: no Hub id
    assert card.data.pipeline_tag == "text-to-image" and "ppcl" in card.data.tags
    assert "| `transformer_blocks` | 6 | 4 |" in card.content and str(tmp_path) not in card.content


def test_ppcl_push_uploads_an_addon_or_merged_folder_with_a_card_for_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ppcl push``: one commit holding every file of the folder (as it is, not copied) and a regenerated card whose
    snippet loads the repo; the folder itself is unchanged; a folder ppcl did not write is refused."""
    commits: list[dict[str, Any]] = []

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        return repo_id

    def create_commit(self: Any, **kwargs: Any) -> Any:
        ops = {op.path_in_repo: op.path_or_fileobj for op in kwargs["operations"]}
        commits.append({"repo_id": kwargs["repo_id"], "ops": ops})
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/2"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    model = build_tiny("sd3").model
    addon, folder = _addon_folder(tmp_path, model)
    save_merged(merge(model, addon, "b"), tmp_path / "merged")
    for source, repo, loader in ((folder, "me/sd3-ppcl", "PruningAddon.from_pretrained"),
                                 (tmp_path / "merged", "me/sd3-b", "ppcl.load_merged")):  # fmt: skip
        before = {p.name: p.read_bytes() for p in source.iterdir()}
        assert main(["push", str(source), "--repo", repo, "--license", "apache-2.0"]) == 0
        ops = commits[-1]["ops"]
        assert commits[-1]["repo_id"] == repo and set(ops) == {n for n in before if not n.startswith(".")}
        card = ModelCard(ops["README.md"].decode("utf-8"))
        assert card.data.license == "apache-2.0" and f"{repo!r}" in card.text and loader in card.text
        assert str(tmp_path) not in card.text
        assert all(ops[n] == str(source / n) for n in ops if n != "README.md")  # uploaded from the folder itself
        assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    assert main(["push", str(tmp_path / "other"), "--repo", "me/x"]) == 2
    assert main(["push", str(folder), "--repo", "not a repo"]) == 2
    assert len(commits) == 2


def test_a_gguf_file_resolves_from_the_cache(offline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--gguf owner/name/file.gguf`` (``load_transformer(..., gguf=...)``) reads the file from the local cache, as
    ``hf download owner/name file.gguf`` leaves it; a file that is not cached is refused with that command, offline."""
    from ppcl.data.loading import load_transformer
    from ppcl.storage import has_quantized_weights
    from test_quantized import write_gguf

    case = build_tiny("flux")
    case.model.save_pretrained(tmp_path / "flux")
    (tmp_path / "repo").mkdir()
    write_gguf(case.model, tmp_path / "repo" / "flux-Q8_0.gguf", "Q8_0")
    _prefill(offline, "someone/tiny-flux-gguf", tmp_path / "repo")
    model = load_transformer(tmp_path / "flux", gguf="someone/tiny-flux-gguf/flux-Q8_0.gguf")
    assert has_quantized_weights(model)
    PruningAddon.from_plan(model, two_span_plan(model))  # students from the cached GGUF teacher
    argv = ["-q", "eval", "--model", str(tmp_path / "flux"), "--gguf", "someone/tiny-flux-gguf/flux-Q4_0.gguf",
            "--addon", str(tmp_path / "none"), "--out", str(tmp_path / "eval.json")]  # fmt: skip
    assert main(argv) == 2
    assert "hf download someone/tiny-flux-gguf flux-Q4_0.gguf" in capsys.readouterr().err
