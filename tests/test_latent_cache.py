"""Latent caches (image + caption folders, tar shards, teacher generations) and LatentCacheData, on tiny pipelines.

Same verbs and flags as docs/real-models.md ("Training data: prompts or image+caption").
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ppcl
from ppcl.cli.main import main
from ppcl.data.images import (
    assign_bucket,
    make_buckets,
    scan_folder,
    scan_shards,
    to_bucket,
)
from ppcl.data.latent_build import build_image_cache, build_prompt_cache
from ppcl.data.latent_cache import LatentCache
from ppcl.distill.latent_data import LatentCacheData, shift_sigmas
from ppcl.errors import PPCLError
from tiny_pipelines import WORDS, build_flux, build_flux2_klein, build_qwen, build_sd3

BUILDERS = {
    "flux": (build_flux, 16),
    "sd3": (build_sd3, 16),
    "qwenimage": (build_qwen, 32),
    "flux2": (build_flux2_klein, 16),
}
SIZES = [(16, 16), (30, 18), (18, 30), (20, 20)]  # (width, height): square, wide, tall, square


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {name: build(root / name) for name, (build, _) in BUILDERS.items()}


def _write_images(folder: Path, scale: int = 1) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h * scale, w * scale, 3), dtype=np.uint8)
        suffix = ".jpg" if i == 3 else ".png"
        Image.fromarray(pixels).save(folder / f"img{i}{suffix}")
        (folder / f"img{i}.txt").write_text(f"a {WORDS[1 + i]} circle on the grass\n")
    return folder


def _write_tar(folder: Path, tar_path: Path) -> Path:
    with tarfile.open(tar_path, "w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=file.name)
    return tar_path


def test_buckets_keep_pixels_and_pick_closest_aspect() -> None:
    buckets = make_buckets(16, 4)
    assert buckets[0] == (16, 16) and (12, 20) in buckets and (20, 12) in buckets
    assert all(h % 4 == 0 and w % 4 == 0 and abs(h * w - 256) <= 16 for h, w in buckets)
    assert buckets[assign_bucket((30, 18), buckets)] == (12, 20)  # wide image → wide bucket (H, W)
    assert buckets[assign_bucket((18, 30), buckets)] == (20, 12)
    assert buckets[assign_bucket((20, 20), buckets)] == (16, 16)
    with pytest.raises(PPCLError, match="multiple of 4"):
        make_buckets(18, 4)


def test_image_cache_matches_direct_vae_encoding(pipes: dict[str, Path], tmp_path: Path) -> None:
    folder = _write_images(tmp_path / "imgs")
    pipe = ppcl.load_pipeline(pipes["flux"])
    out = build_image_cache(
        pipe,
        scan_folder(folder),
        tmp_path / "cache",
        16,
        pipeline_path=pipes["flux"],
        shard_size=1,
        free_encoders=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "ppcl.LatentCache" and manifest["arch"] == "flux"
    assert manifest["buckets"][0] == [16, 16] and manifest["n_samples"] == 4
    assert manifest["pipeline"]["path"] == str(pipes["flux"].resolve()) and len(manifest["pipeline"]["hash"]) == 16
    assert manifest["encoder"]["max_sequence_length"] == 512 and manifest["scheduler"]["use_dynamic_shifting"]
    assert manifest["data"]["source"] == "images"
    by_key = {s["keys"][0]: s for s in manifest["shards"]}
    buckets = [tuple(b) for b in manifest["buckets"]]
    assert buckets[by_key["img1"]["bucket"]] == (12, 20) and buckets[by_key["img2"]["bucket"]] == (20, 12)
    assert sum(manifest["counts"]) == 4 and manifest["counts"][0] == 2  # img0 + img3 (jpg) in the square bucket
    cache = LatentCache(out)
    cache.verify()
    vae = pipe.vae
    for record in scan_folder(folder):
        shard = by_key[record.key]
        with torch.no_grad():
            pixels = to_bucket(record.open(), buckets[shard["bucket"]])[None]
            direct = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
            embeds, pooled, _ = pipe.encode_prompt(record.caption, None)
        row = [s["file"] for s in manifest["shards"] if s["bucket"] == shard["bucket"]].index(shard["file"])
        got = cache.read(shard["bucket"], [row])
        assert got["latents"].shape == (1, 4, buckets[shard["bucket"]][0] // 2, buckets[shard["bucket"]][1] // 2)
        torch.testing.assert_close(got["latents"], direct)
        torch.testing.assert_close(got["prompt_embeds"], embeds)
        torch.testing.assert_close(got["pooled_prompt_embeds"], pooled)
    # The same images in a webdataset shard give the same cache content; the encoders are released afterwards.
    tar = _write_tar(folder, tmp_path / "data-000.tar")
    records = scan_shards(str(tmp_path / "data-*.tar"))
    assert [r.key for r in records] == [r.key for r in scan_folder(folder)]
    out2 = build_image_cache(pipe, records, tmp_path / "cache2", 16, shard_size=1)
    assert pipe.vae is None and pipe.text_encoder is None and pipe.text_encoder_2 is None
    shards2 = json.loads((out2 / "manifest.json").read_text())["shards"]
    assert [s["content_hash"] for s in shards2] == [s["content_hash"] for s in manifest["shards"]]
    assert tar.is_file()


def test_bad_data_is_refused_without_partial_cache(pipes: dict[str, Path], tmp_path: Path) -> None:
    bad = _write_images(tmp_path / "nocap")
    (bad / "img1.txt").unlink()
    with pytest.raises(PPCLError, match="no caption"):
        scan_folder(bad)
    broken = _write_images(tmp_path / "broken")
    (broken / "img2.png").write_bytes(b"not an image")
    with pytest.raises(PPCLError, match="cannot be read"):
        scan_folder(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PPCLError, match="no images"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(PPCLError, match="no tar shards"):
        scan_shards(str(tmp_path / "none-*.tar"))
    for folder in ("nocap", "broken", "empty"):
        out = tmp_path / f"out-{folder}"
        argv = [
            "-q",
            "cache",
            "--pipeline",
            str(pipes["flux"]),
            "--images",
            str(tmp_path / folder),
            "--resolution",
            "16",
            "--out",
            str(out),
        ]
        assert main(argv) == 2 and not out.exists()
    # A failure while encoding (an image gone after the scan) leaves neither the cache nor a temporary folder.
    good = _write_images(tmp_path / "good")
    records = scan_folder(good)
    (good / "img3.jpg").unlink()
    with pytest.raises(PPCLError, match="cannot be read"):
        build_image_cache(ppcl.load_pipeline(pipes["flux"]), records, tmp_path / "partial", 16, shard_size=1)
    assert not any(p.name.startswith((".partial", "partial")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_cache_data_feeds_the_transformer(arch: str, pipes: dict[str, Path], tmp_path: Path) -> None:
    _, res = BUILDERS[arch]
    folder = _write_images(tmp_path / "imgs", scale=res // 16)
    pipe = ppcl.load_pipeline(pipes[arch])
    out = build_image_cache(pipe, scan_folder(folder), tmp_path / "cache", res, shard_size=3, free_encoders=False)
    cache = LatentCache(out)
    first = scan_folder(folder)[0]  # img0, square: row 0 of bucket 0
    vae = pipe.vae
    with torch.no_grad():
        pixels = to_bucket(first.open(), cache.buckets[0])[None]
        if arch == "qwenimage":  # 5-D VAE, per-channel mean / std
            z = vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))
            direct = (z - mean) / std
        elif arch == "flux2":  # the pipeline's own encoding (patchify + BatchNorm), stored unpatchified
            direct = pipe._unpatchify_latents(pipe._encode_vae_image(pixels, None))
        else:
            direct = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(cache.read(0, [0])["latents"], direct)
    data = LatentCacheData(out, batch_size=3, seed=1, caption_dropout=0.5)
    data.check_model(pipe.transformer)
    for step in range(4):
        batch = data.batch(step)
        with torch.no_grad():
            pred = pipe.transformer(**batch, return_dict=False)[0]
        assert pred.shape == batch["hidden_states"].shape and torch.isfinite(pred).all()
    batch = data.batch(0)
    same = data.batch(0)
    for key, value in batch.items():
        assert torch.equal(value, same[key]) if isinstance(value, torch.Tensor) else value == same[key]
    timestep = batch["timestep"]
    assert ((timestep > 1) if arch == "sd3" else (timestep <= 1)).any()  # SD3 takes σ·1000, the others σ
    if arch == "qwenimage":
        assert batch["encoder_hidden_states_mask"].shape == batch["encoder_hidden_states"].shape[:2]
        assert batch["img_shapes"][0][0][0] == 1
    if arch == "flux":
        assert batch["img_ids"].shape == (batch["hidden_states"].shape[1], 3)
    if arch == "flux2":  # (B, N, 4) ids as the pipeline passes them; one token per 2x2 patch of the stored latents
        n = batch["hidden_states"].shape[1]
        assert (
            batch["img_ids"].shape == (3, n, 4)
            and batch["txt_ids"].shape[:2] == batch["encoder_hidden_states"].shape[:2]
        )
    assert data.describe()["source"] == "latent_cache"


def test_sigmas_follow_the_scheduler_shift(pipes: dict[str, Path]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    u = torch.linspace(1.0, 0.05, 20)
    configs = [
        {"shift": 3.0},
        {
            "use_dynamic_shifting": True,
            "base_shift": 0.5,
            "max_shift": 1.15,
            "base_image_seq_len": 16,
            "max_image_seq_len": 256,
        },
    ]
    for config in configs:
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        mu = 0.5 + (1.15 - 0.5) / (256 - 16) * (64 - 16) if config.get("use_dynamic_shifting") else None
        scheduler.set_timesteps(sigmas=u.numpy(), mu=mu)
        torch.testing.assert_close(shift_sigmas(u, dict(scheduler.config), 64), scheduler.sigmas[:-1])
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    assert shift_sigmas(u, {"shift": 3.0}, 64).mean() > shift_sigmas(u, {"shift": 1.0}, 64).mean() + 0.1


def test_flux2_sigmas_follow_the_pipelines_empirical_shift() -> None:
    """FLUX.2's pipelines set ``mu`` with their empirical formula (token count and 50 default steps), not the
    scheduler's linear one: ppcl's σ equal the scheduler's for that ``mu`` at 1,024 and 4,096 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    u = torch.linspace(1.0, 0.05, 20)
    config = {"use_dynamic_shifting": True, "time_shift_type": "exponential"}
    for tokens in (1024, 4096):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        scheduler.set_timesteps(sigmas=u.numpy(), mu=compute_empirical_mu(tokens, 50))
        ours = shift_sigmas(u, dict(scheduler.config), tokens, arch="flux2")
        torch.testing.assert_close(ours, scheduler.sigmas[:-1])
        assert not torch.allclose(ours, shift_sigmas(u, dict(scheduler.config), tokens, arch="flux"))


def test_prompt_cache_and_cli_distill(pipes: dict[str, Path], tmp_path: Path) -> None:
    from ppcl.plan import DepthReplacement, Level, PruningPlan, Span

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left of a cat\n")
    for arch in ("flux", "qwenimage"):
        _, res = BUILDERS[arch]
        pipe = ppcl.load_pipeline(pipes[arch])
        out = build_prompt_cache(
            pipe, prompts.read_text().splitlines(), tmp_path / f"gen-{arch}", res, num_inference_steps=2
        )
        assert pipe.vae is None and pipe.text_encoder is None
        cache = LatentCache(out)
        assert cache.counts[0] == 2 and cache.manifest["data"]["source"] == "prompts"
        assert cache.read(0, [0, 1])["latents"].shape == (
            2,
            4,
            res // (2 if arch == "flux" else 4),
            res // (2 if arch == "flux" else 4),
        )
    # Same latents as the teacher's own sampling with the recorded seed.
    pipe = ppcl.load_pipeline(pipes["flux"])
    seed = LatentCache(tmp_path / "gen-flux").manifest["data"]["noise_seeds"][0]
    packed = pipe(
        prompt="a red circle",
        height=16,
        width=16,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    ).images
    torch.testing.assert_close(
        LatentCache(tmp_path / "gen-flux").read(0, [0])["latents"],
        pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor),
    )
    # CLI: ppcl cache (images, then prompts) + ppcl distill --pipeline --data, 2 steps.
    folder = _write_images(tmp_path / "imgs")
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "-q",
                "cache",
                "--pipeline",
                str(pipes["sd3"]),
                "--images",
                str(folder),
                "--resolution",
                "16",
                "--out",
                str(cache),
            ]
        )
        == 0
    )
    _write_tar(folder, tmp_path / "shard-000.tar")
    assert (
        main(
            [
                "-q",
                "cache",
                "--pipeline",
                str(pipes["sd3"]),
                "--shards",
                str(tmp_path / "shard-*.tar"),
                "--resolution",
                "16",
                "--out",
                str(tmp_path / "wds"),
            ]
        )
        == 0
    )
    assert LatentCache(tmp_path / "wds").counts == LatentCache(cache).counts
    assert (
        main(
            [
                "-q",
                "cache",
                "--pipeline",
                str(pipes["sd3"]),
                "--prompts",
                str(prompts),
                "--resolution",
                "16",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "gen"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "cache",
                "--pipeline",
                str(pipes["sd3"]),
                "--images",
                str(folder),
                "--resolution",
                "16",
                "--out",
                str(cache),
            ]
        )
        == 2
    )  # never overwrites
    model = ppcl.load_pipeline(pipes["sd3"]).transformer
    plan = PruningPlan(
        "sd3",
        type(model).__name__,
        (6,),
        [DepthReplacement(Span(2, 4))],
        [Level("d1", ("depth:2-4",))],
        protect_first=1,
        protect_last=1,
    ).validate()
    plan.save(tmp_path / "plan")
    run = [
        "-q",
        "distill",
        "--pipeline",
        str(pipes["sd3"]),
        "--plan",
        str(tmp_path / "plan"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "0",
    ]
    for data in (cache, tmp_path / "gen"):
        assert main([*run, "--data", str(data), "--out", str(tmp_path / f"run-{data.name}")]) == 0
        addon = json.loads(next((tmp_path / f"run-{data.name}" / "addon").glob("*.json")).read_text())
        assert "latent_cache" in json.dumps(addon)
    assert main([*run, "--data", str(cache), "--calibration", str(cache), "--out", str(tmp_path / "x")]) == 2
    assert main([*run, "--data", str(tmp_path / "gen-flux"), "--out", str(tmp_path / "y")]) == 2  # other model


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_a_manifest_path_leaving_the_cache_is_refused(pipes: dict[str, Path], tmp_path: Path, entry: str) -> None:
    """Issue 14 (containment): a shard path from the manifest must resolve inside the cache folder."""
    import json

    out = build_image_cache(
        ppcl.load_pipeline(pipes["flux"]), scan_folder(_write_images(tmp_path / "img")), tmp_path / "cache", 16
    )
    (tmp_path / "outside.safetensors").write_bytes((out / "shard_00000.safetensors").read_bytes())
    if entry == "link.safetensors":
        (out / entry).symlink_to(tmp_path / "outside.safetensors")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = entry
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PPCLError, match="path in the manifest leaves its folder") as err:
        LatentCache(out)
    assert repr(entry) in str(err.value)


def test_a_modified_shard_is_refused_on_first_read(pipes: dict[str, Path], tmp_path: Path) -> None:
    """Issue 14 (integrity): shard hashes are checked the first time training reads a shard, not only by verify()."""
    from safetensors.torch import load_file, save_file

    out = build_image_cache(
        ppcl.load_pipeline(pipes["flux"]), scan_folder(_write_images(tmp_path / "img")), tmp_path / "cache", 16
    )
    shard = out / "shard_00000.safetensors"
    tensors = load_file(shard)
    tensors["latents"] = tensors["latents"] + 1.0
    save_file(tensors, shard)
    with pytest.raises(PPCLError, match="shard does not match its manifest"):
        LatentCache(out).read(0, [0])


def test_flux2_generated_latents_are_normalised_back(pipes: dict[str, Path]) -> None:
    """``Flux2KleinPipeline(output_type="latent")`` returns un-normalised, unpatchified latents; ppcl's cache form
    undoes exactly the pipeline's own decode step (``latents * bn_std + bn_mean`` on the 2x2 patches)."""
    from ppcl.arch import get_spec

    pipe = ppcl.load_pipeline(pipes["flux2"])
    with torch.no_grad():
        pipe.vae.bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))  # non-trivial statistics
        pipe.vae.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
    generated = pipe(
        prompt="a red circle", height=16, width=16, num_inference_steps=2, output_type="latent",
        max_sequence_length=16, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    ours = get_spec(pipe.transformer).latent_format().unpack_generated(pipe, generated, 16, 16)
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    patches = pipe._patchify_latents(ours)
    back = patches * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps) + bn.running_mean.view(1, -1, 1, 1)
    assert ours.shape == generated.shape and not torch.allclose(ours, generated)
    torch.testing.assert_close(pipe._unpatchify_latents(back), generated)
