"""The Hugging Face Hub, offline-first: Hub ids resolve through ``huggingface_hub``'s local cache; uploads on request.

ppcl never reaches the network unless told to: every reader takes ``local_files_only=True`` by default, so a Hub id
(``owner/name``) is served from a snapshot already in the cache (``hf download owner/name`` fills it, as does any
earlier diffusers ``from_pretrained``). Pass ``local_files_only=False`` to let ``huggingface_hub`` download it. A
local folder of the same spelling always wins over a Hub id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ppcl.errors import ArtefactError
from ppcl.logging import get_logger

_log = get_logger(__name__)
_SNAPSHOT = re.compile(r"models--([^/\\]+)[/\\]snapshots[/\\]")  # repo names never hold "--" (the Hub forbids it)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a Hub repository id (``owner/name`` or ``name``) rather than a path."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def repo_id_of_path(path: str) -> str | None:
    """The Hub repo id of a path inside a Hugging Face cache snapshot (``…/models--owner--name/snapshots/<commit>/…``),
    else ``None``: a model loaded from the cache still knows which Hub repo it came from."""
    match = _SNAPSHOT.search(path)
    return match.group(1).replace("--", "/") if match else None


def resolve_folder(
    source: str | os.PathLike[str],
    what: str,
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of ``source``: itself when it exists here, else the cached snapshot of Hub repo ``source``.

    Args:
        source: a local folder, or a Hub repository id.
        what: what the folder should hold, for messages (``"add-on"``).
        revision: a branch, tag or commit of the Hub repo (default ``main``).
        local_files_only: never reach the network (the default); ``False`` lets ``huggingface_hub`` download.
        cache_dir: the Hugging Face cache to use (default: ``HF_HUB_CACHE``).
        token: passed to ``huggingface_hub`` for private repos.

    Raises:
        ArtefactError: no such folder and not a Hub id; a Hub id whose snapshot is not cached (with
            ``local_files_only``); a repo or revision the Hub does not have.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    if not is_hub_id(name):
        raise ArtefactError(
            f"{what} folder not found: {name}",
            expected=f"a local {what} folder or a Hub repository id (owner/name)",
            found="no such folder, and not spelled like a Hub id",
            fix="check the path",
        )
    missing = f"No {what} folder {name!r} here, and no snapshot of the Hub repo {name!r} in the local cache"
    with _cache_lookup(what, name, revision, missing, "a local folder, or a Hub repo", f"hf download {name}"):
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only,
            token=token,
        )
    _log.info("%s %s: Hub snapshot %s", what, name, folder)
    return Path(folder)


def resolve_file(
    source: str | os.PathLike[str],
    what: str,
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local path of file ``source``: itself when it exists here, else ``owner/name/path/in/repo`` resolved to
    the cached file of Hub repo ``owner/name`` (e.g. ``city96/Qwen-Image-gguf/qwen-image-Q4_K_M.gguf`` after
    ``hf download city96/Qwen-Image-gguf qwen-image-Q4_K_M.gguf``). Other arguments as :func:`resolve_folder`.

    Raises:
        ArtefactError: no such file and not spelled ``owner/name/file``; a Hub file not in the cache (with
            ``local_files_only``); a repo, revision or file the Hub does not have.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = str(source)
    parts = name.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if len(parts) < 3 or not filename or not is_hub_id(repo_id) or name.startswith((".", "/", "~")):
        raise ArtefactError(
            f"{what} not found: {name}",
            expected=f"a local {what}, or owner/name/file of a Hub repo in the local cache",
            found="no such file, and not spelled owner/name/file",
            fix="check the path",
        )
    missing = f"No {what} {name!r} here, and no {filename!r} of the Hub repo {repo_id!r} in the local cache"
    with _cache_lookup(
        what, name, revision, missing, "a local file, or a Hub file", f"hf download {repo_id} {filename}"
    ):
        cached = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only,
            token=token,
        )
    _log.info("%s %s: Hub file %s", what, name, cached)
    return Path(cached)


@contextmanager
def _cache_lookup(
    what: str, name: str, revision: str | None, missing: str, wanted: str, download: str
) -> Iterator[None]:
    """``huggingface_hub``'s lookup errors inside the block as :class:`ArtefactError`: ``missing`` heads the message
    when the cache lacks it (``wanted`` what would do, ``download`` the command that fills the cache)."""
    try:
        yield
    except LocalEntryNotFoundError as err:
        raise ArtefactError(
            missing,
            expected=f"{wanted} already downloaded (revision {revision or 'main'})",
            found=f"nothing at ./{name}; huggingface_hub: {str(err).splitlines()[0]}",
            fix=f"`{download}` first (ppcl never downloads by default), or pass local_files_only=False",
        ) from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise ArtefactError(
            f"The Hub cannot give {what} {name!r}",
            expected=f"a readable Hub repo (revision {revision or 'main'})",
            found=f"{type(err).__name__}: {str(err).splitlines()[0]}",
            fix="check the id (and file name), the revision and your token (`hf auth login`)",
        ) from err


def upload_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with ppcl",
    create_pr: bool = False,
) -> str:
    """Create the Hub model repo ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL."""
    info = _model_repo(repo_id, token, private).upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
    )
    _log.info("uploaded %s to %s: %s", folder, repo_id, info.commit_url)
    return str(info.commit_url)


def upload_with_card(
    folder: str | os.PathLike[str],
    repo_id: str,
    card: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with ppcl",
    create_pr: bool = False,
) -> str:
    """Upload every file of ``folder`` (hidden ones left out) with ``card`` as its ``README.md``, in one commit, without
    copying or changing the folder (add-ons of 20B models hold gigabytes); returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.relative_to(root).as_posix().startswith("."))
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(root).as_posix(), path_or_fileobj=str(p))
        for p in files
        if p.relative_to(root).as_posix() != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    info = _model_repo(repo_id, token, private).create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )
    _log.info("uploaded %s (%d files) to %s: %s", root, len(operations), repo_id, info.commit_url)
    return str(info.commit_url)


def _model_repo(repo_id: str, token: str | bool | None, private: bool | None) -> HfApi:
    """A Hub client, after creating the model repo ``repo_id`` if it does not exist yet."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api
