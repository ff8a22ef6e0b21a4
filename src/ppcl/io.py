"""Artefact files: atomic folder writes, safetensors reading with clear errors, content hashes.

Every artefact is a folder of JSON + safetensors. A folder is written into a temporary sibling and renamed into place
only when complete, so a failed or killed run never leaves a partial artefact behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ppcl.errors import ArtefactError
from ppcl.faults import fault_point
from ppcl.outputs import OutputKind, check_output

# What a full disk, a quota, a read-only mount or missing permissions raise while writing (other OSErrors are bugs or
# the caller's own reads, and stay visible).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def atomic_folder(path: str | os.PathLike[str], kind: OutputKind, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path``, on error it is removed.

    ``path`` must pass :func:`ppcl.outputs.check_output` for ``kind``: an existing folder is replaced only when ppcl
    wrote it as ``kind`` and ``overwrite`` is true.
    """
    path = check_output(path, kind, overwrite=overwrite)
    parent = path.parent if str(path.parent) else Path(".")
    _check_writable(parent)
    remove_debris(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    follow_umask(tmp)
    try:
        try:
            yield tmp
            fault_point("write", path.name)
            for item in tmp.rglob(
                "*"
            ):  # safetensors writes its files 0600 whatever the umask: so do not rely on writers
                follow_umask(item)
            _fsync_tree(tmp)
            if path.exists():
                # Swap through a second name so a reader never sees a missing folder for long.
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
                os.replace(path, old / "x")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except OSError as exc:  # disk full or permissions while writing: one line for the user, no partial folder
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise _write_error(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def follow_umask(path: Path) -> None:
    """Give a file or folder made by ``tempfile`` (always private: ``0600`` / ``0700``) the mode a plain ``open`` /
    ``mkdir`` would have given it under the process umask, so artefacts are as shared as the user's other files."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it; restored at once
    os.umask(mask)
    if not path.is_symlink():
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def remove_debris(path: Path) -> list[Path]:
    """Remove what killed writes of ``path`` left beside it: ``.<name>.XXXXXXXX.tmp`` / ``.old`` folders (this module's
    own temp names) and the nested ``..<name>.XXXXXXXX.tmp.YYYYYYYY.tmp`` of a write inside a temp folder. Only those
    exact patterns match, so a user's file is never touched. Returns what was removed."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.\.?{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)(\.[A-Za-z0-9_]{{8}}\.tmp)?$")
    gone = [p for p in parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink()]
    for debris in gone:
        shutil.rmtree(debris, ignore_errors=True)
    return gone


def _check_writable(parent: Path) -> None:
    blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ArtefactError(
            "cannot create the output folder",
            expected="a path whose parents are folders",
            found=f"{blocker} is a file",
            fix="choose another --out",
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtefactError(
            "cannot create the output folder",
            expected="a writable location",
            found=f"{parent}: {exc.strerror}",
            fix="choose another --out",
        ) from exc
    if not os.access(parent, os.W_OK):
        raise ArtefactError(
            "output location is not writable",
            expected="a writable folder",
            found=str(parent),
            fix="choose another --out or fix its permissions",
        )


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; when the block ends without error it is flushed to disk and
    renamed over ``path``, otherwise removed. Readers only ever see the old or the complete new file.

    The temp name is unpredictable and created exclusively (``mkstemp``), so a planted ``X.tmp`` symlink is never
    followed; it keeps ``path``'s suffix, for writers that pick a format from it (PIL). A full disk or a read-only
    location is an :class:`ArtefactError`; other ``OSError`` s stay visible.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        follow_umask(Path(name))
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(path, exc) from exc
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (:func:`atomic_file`)."""
    return write_text(json.dumps(data, indent=2) + "\n", path)


def _write_error(path: Path, exc: OSError) -> ArtefactError:
    """Disk full, read-only or missing permissions while writing ``path``, as a one-line error."""
    return ArtefactError(
        "cannot write the output",
        expected="a writable location with free space",
        found=f"{path}: {exc.strerror or exc}",
        fix="free some space, fix the permissions or choose another --out (nothing partial was left behind)",
    )


def read_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a JSON object; a missing or malformed file raises :class:`ArtefactError` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(
            f"{what} not found",
            expected=f"a file {path.name}",
            found=f"nothing at {path}",
            fix=f"pass the folder a ppcl command wrote for the {what}",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtefactError(
            f"{what} is not valid JSON",
            expected="a JSON object",
            found=f"{path}: {exc}",
            fix="re-create it with ppcl or fix the file by hand",
        ) from exc
    if not isinstance(data, dict):
        raise ArtefactError(
            f"{what} is not a JSON object",
            expected="a JSON object",
            found=type(data).__name__,
            fix="re-create it with ppcl",
        )
    return data


def contained_file(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a file name read from ``folder``'s own manifest, refused unless it stays inside ``folder``:
    no absolute path, no ``..``, no symlink resolving outside (a manifest must not make ppcl read elsewhere).

    Raises:
        ArtefactError: naming the manifest entry.
    """
    bad = not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts
    path = folder / str(name)
    root = folder.resolve()
    if bad or root not in path.resolve().parents:
        raise ArtefactError(
            f"a {what} path in the manifest leaves its folder",
            expected=f"a file name inside {folder}",
            found=repr(name),
            fix="the manifest was edited or the folder holds a symlink out of it; re-create the artefact with ppcl",
        )
    return path


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, on CPU) to a safetensors file; tensors sharing memory are stored separately."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        out[key] = value
    save_file(out, str(path), metadata=metadata)
    follow_umask(Path(path))  # safetensors makes the file 0600


def load_tensors(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file raises :class:`ArtefactError`."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(
            f"{what} weights not found",
            expected=f"a file {path.name}",
            found=f"nothing at {path}",
            fix="re-create the artefact with ppcl",
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:  # what a truncated or corrupt file raises
        raise ArtefactError(
            f"{what} weights are unreadable",
            expected="a complete safetensors file",
            found=f"{path}: {type(exc).__name__}: {exc}",
            fix="the file is truncated or corrupt; re-create the artefact",
        ) from exc


def content_hash(tensors: Mapping[str, torch.Tensor], meta: Any = None) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes (sorted by name) plus canonical JSON of ``meta``."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if meta is not None:
        digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


STORAGE_CONFIG_KEYS = frozenset({"quantization_config"})
"""Config entries that say how the weights are stored, not which model it is: a quantised base is the same base."""


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a model config (keys starting with ``_`` and :data:`STORAGE_CONFIG_KEYS` ignored)."""
    clean = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in config.items()
        if not k.startswith("_") and k not in STORAGE_CONFIG_KEYS
    }
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(state: Mapping[str, Any], folder: Path, name: str) -> None:
    """Write a nested training state (dicts, lists, numbers, strings, tensors) as ``name.json`` + ``name.safetensors``
    in ``folder``, so nothing is ever pickled: tensors go to the safetensors file, the JSON holds
    ``{"__tensor__": key}`` in their place, and dicts with integer keys (an optimiser's per-parameter state) are kept
    as ``{"__int_keys__": {...}}``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    save_tensors(tensors, folder / f"{name}.safetensors", metadata={"format": "pt", "ppcl_format": "state"})
    (folder / f"{name}.json").write_text(
        json.dumps({"format": "ppcl.state", "version": 1, "state": tree}) + "\n", encoding="utf-8"
    )


def load_state(folder: Path, name: str, what: str) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; a missing, truncated or foreign pair raises :class:`ArtefactError`."""
    data = read_json(folder / f"{name}.json", what)
    tensors = load_tensors(folder / f"{name}.safetensors", what)
    if data.get("format") != "ppcl.state" or not isinstance(data.get("state"), dict):
        raise ArtefactError(
            f"{what} is not a ppcl training state",
            expected="format ppcl.state with a state object",
            found=f"{folder / name}.json: format {data.get('format')!r}",
            fix="start the run again (--overwrite)",
        )
    try:
        return _decode(data["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtefactError(
            f"{what} is incomplete",
            expected="every tensor its JSON names",
            found=f"{folder / name}.*: {type(exc).__name__}: {exc}",
            fix="the files are from different writes or damaged; start the run again",
        ) from exc


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise TypeError(f"two state entries flatten to the same key {key!r}")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {"__int_keys__": {str(k): _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        raise TypeError(f"state keys at {key!r} are neither all strings nor all integers")
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {key!r} in a training state")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__int_keys__"}:
            return {int(k): _decode(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
