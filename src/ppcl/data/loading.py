"""Loading real models from local folders (never from a hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ppcl.arch import get_spec
from ppcl.errors import ArtefactError, ConfigError
from ppcl.io import read_json

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


DTYPE_CHOICES: tuple[str, ...] = tuple(_DTYPES)
"""The names ``--dtype`` accepts."""


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` → ``torch.bfloat16`` etc.; unknown names raise :class:`ConfigError`."""
    if name not in _DTYPES:
        raise ConfigError("unknown dtype", expected=" | ".join(_DTYPES), found=name, fix="pass e.g. --dtype bf16")
    return _DTYPES[name]


QUANTIZE_CHOICES: tuple[str, ...] = ("none", "int8", "fp8", "nf4", "bnb8")
"""The names ``--quantize`` accepts: torchao int8 / fp8 weight-only, bitsandbytes NF4 (4-bit) / LLM.int8 (8-bit)."""


def quantization_config(name: str, dtype: torch.dtype | None) -> Any:
    """The diffusers ``quantization_config`` that loads a frozen teacher as ``name`` (:data:`QUANTIZE_CHOICES`), or
    ``None`` for ``"none"``. torchao runs on CPU and GPU; diffusers' bitsandbytes loader needs a GPU.

    Raises:
        ConfigError: an unknown name, or the library it needs is not installed.
    """
    if name == "none":
        return None
    if name not in QUANTIZE_CHOICES:
        raise ConfigError("unknown quantisation", expected=" | ".join(QUANTIZE_CHOICES), found=name, fix="e.g. int8")
    library = "torchao" if name in ("int8", "fp8") else "bitsandbytes"
    try:
        __import__(library)
    except ImportError as err:
        raise ConfigError(
            f"--quantize {name} needs {library}",
            expected=f"{library} installed",
            found=f"ImportError: {err}",
            fix=f'pip install "ppcl[quant]" (or {library})',
        ) from err
    import diffusers

    if name in ("int8", "fp8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        return diffusers.TorchAoConfig(Int8WeightOnlyConfig() if name == "int8" else Float8WeightOnlyConfig())
    if name == "nf4":
        return diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype or torch.bfloat16
        )
    return diffusers.BitsAndBytesConfig(load_in_8bit=True)


def load_transformer(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = torch.float32,
    quantize: str = "none",
    gguf: str | os.PathLike[str] | None = None,
) -> Any:
    """A supported diffusers transformer from a local folder: a transformer folder or a pipeline folder (``dtype``
    ``None``: diffusers' default), optionally loaded quantised (``quantize``, see :func:`quantization_config`) or
    with its weights read from a GGUF file (``gguf``: its config from ``path``; see :func:`load_gguf_transformer`):
    a frozen teacher for add-ons and distillation, never a model to merge."""
    if gguf is not None and quantize != "none":
        raise ConfigError(
            "--gguf and --quantize both say how the transformer is quantised",
            expected="one of them",
            found=f"--gguf {gguf} --quantize {quantize}",
            fix="drop --quantize (the GGUF file is quantised already)",
        )
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config = folder / "config.json"
    if not config.is_file():
        raise ArtefactError(
            "no diffusers model here",
            expected="a folder with config.json (or transformer/)",
            found=str(path),
            fix="pass a local pipeline or transformer folder",
        )
    import json

    import diffusers

    class_name = json.loads(config.read_text()).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ArtefactError(
            "unknown model class in config.json",
            expected="a diffusers transformer class",
            found=repr(class_name),
            fix="point to the transformer of a supported pipeline",
        )
    get_spec(cls)  # fail early for unsupported classes
    if gguf is not None:
        return load_gguf_transformer(cls, folder, gguf, dtype)
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    config = quantization_config(quantize, dtype)
    if config is not None:
        kwargs["quantization_config"] = config
    model = _gpu_needed(quantize, lambda: cls.from_pretrained(str(folder), local_files_only=True, **kwargs))
    return model.eval().requires_grad_(False)


def load_gguf_transformer(
    cls: type, config_folder: Path, gguf: str | os.PathLike[str], dtype: torch.dtype | None
) -> Any:
    """``cls`` with the weights of the GGUF file ``gguf`` (e.g. a community ``Q4_K_M`` / ``Q8_0`` conversion of the
    transformer; a local path, or ``owner/name/file.gguf`` of a Hub repo in the local cache) and the config of
    ``config_folder``, read by diffusers' ``from_single_file`` with
    ``GGUFQuantizationConfig``: linear weights stay GGUF-quantised and are dequantised in each forward, in ``dtype``
    (``None``: bfloat16). Frozen, in eval mode.

    Raises:
        ConfigError: the ``gguf`` package is missing, or diffusers cannot read single files of ``cls``.
        ArtefactError: ``gguf`` is neither a local file nor a cached Hub file, not a readable GGUF file, or not one
            of this model (other tensor names or shapes).
    """
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    if not any(c.__name__ in SINGLE_FILE_LOADABLE_CLASSES for c in cls.__mro__):
        raise ConfigError(
            f"diffusers cannot load a {cls.__name__} from a single (GGUF) file",
            expected="a family diffusers' from_single_file reads (Qwen-Image, FLUX.1, FLUX.2, SD3/3.5, Wan)",
            found=cls.__name__,
            fix="drop --gguf and use --quantize int8 (torchao) or nf4 (bitsandbytes) for this model",
        )
    from ppcl.hub import resolve_file

    path = resolve_file(gguf, "GGUF file")  # a local file, or owner/name/file.gguf from the Hugging Face cache
    try:
        import gguf as gguf_package  # noqa: F401  (diffusers reads the file with it)
    except ImportError as err:
        raise ConfigError(
            "--gguf needs the gguf package",
            expected="gguf installed",
            found=f"ImportError: {err}",
            fix='pip install "ppcl[quant]" (or gguf)',
        ) from err
    from diffusers import GGUFQuantizationConfig

    compute = dtype or torch.bfloat16
    try:
        model = cls.from_single_file(
            str(path),
            config=str(config_folder),
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute),
            torch_dtype=compute,
            local_files_only=True,
        )
    # What the gguf reader (bad magic), diffusers' file reading and its key conversion (another model's tensors)
    # raise for a file that is not this model's GGUF; the original error stays chained.
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as err:
        if isinstance(err, (torch.OutOfMemoryError, NotImplementedError)):
            raise  # not a property of the file
        first_line = str(err).splitlines()[0].rstrip(". ") if str(err) else ""
        raise ArtefactError(
            "cannot load the GGUF file as this transformer",
            expected=f"a GGUF file of a {cls.__name__} with the config in {config_folder}",
            found=f"{type(err).__name__}: {first_line}",
            fix="pass the GGUF file of this model's transformer (the pipeline it came from as --model / --pipeline)",
        ) from err
    return model.eval().requires_grad_(False)


def _gpu_needed(quantize: str, load: Any) -> Any:
    """``load()``, with diffusers' refusal to run bitsandbytes without CUDA turned into a :class:`ConfigError`."""
    try:
        return load()
    except RuntimeError as err:
        if quantize == "none" or "GPU" not in str(err):
            raise
        raise ConfigError(
            f"--quantize {quantize} needs a GPU",
            expected="a CUDA device for bitsandbytes",
            found=str(err).splitlines()[0].rstrip("."),
            fix="use --quantize int8 or fp8 (torchao, also on CPU), or run on a GPU",
        ) from err


def pipeline_class(path: str | os.PathLike[str]) -> type:
    """The diffusers pipeline class a local pipeline folder names (``model_index.json``), without loading anything."""
    import diffusers

    _require_pipeline_folder(path)
    name = read_json(Path(path) / "model_index.json", "pipeline index").get("_class_name", "")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type):
        raise ArtefactError(
            "unknown pipeline class in model_index.json",
            expected="a diffusers pipeline class",
            found=repr(name),
            fix="use a pipeline this diffusers version has",
        )
    return cls


def pipeline_quantization(quantize: str, dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` keywords that load a pipeline's transformer quantised (:func:`quantization_config`), the
    other components as they are; ``{}`` for ``"none"``."""
    config = quantization_config(quantize, dtype)
    if config is None:
        return {}
    from diffusers import PipelineQuantizationConfig

    return {"quantization_config": PipelineQuantizationConfig(quant_mapping={"transformer": config})}


def load_pipeline_folder(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
    gguf: str | os.PathLike[str] | None = None,
) -> Any:
    """A diffusers pipeline from a local folder (``local_files_only``: nothing is downloaded), its transformer
    optionally quantised (``quantize``: :data:`QUANTIZE_CHOICES`) or read from a GGUF file (``gguf``)."""
    from diffusers import DiffusionPipeline

    _require_pipeline_folder(path)
    if gguf is not None:
        kwargs = {"transformer": load_transformer(path, dtype, quantize, gguf=gguf)}
    else:
        kwargs = pipeline_quantization(quantize, dtype)
    pipe = _gpu_needed(
        quantize,
        lambda: DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs),
    )
    get_spec(pipe.transformer)
    return pipe


def _require_pipeline_folder(path: str | os.PathLike[str]) -> None:
    if not (Path(path) / "model_index.json").is_file():
        raise ArtefactError(
            "not a diffusers pipeline folder",
            expected="a folder with model_index.json",
            found=str(path),
            fix="pass the folder written by `pipeline.save_pretrained`",
        )
