"""Sharing an add-on on the Hub: the one ppcl call that uses the network, and only when asked."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ppcl.addon.card import model_card
from ppcl.addon.manifest import CARD_FILE
from ppcl.hub import upload_folder

if TYPE_CHECKING:
    from ppcl.addon.addon import PruningAddon


def push_addon(
    addon: PruningAddon,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload PPCL pruning add-on",
    create_pr: bool = False,
    license: str | None = None,
) -> str:
    """Upload ``addon`` (its :meth:`~ppcl.addon.PruningAddon.save_pretrained` folder) to the Hub model repo
    ``repo_id``, creating the repo if needed; the card's snippet then loads it by ``repo_id``.

    Args:
        addon: the add-on.
        repo_id: ``owner/name``.
        private: visibility of a newly created repo (``None``: the Hub's default).
        token: a Hub token (default: the logged-in one).
        revision: the branch to commit to.
        commit_message: the commit's message.
        create_pr: open a pull request instead of committing.
        license: the card's ``license`` (the base model's terms usually apply; e.g. ``"apache-2.0"``).

    Returns:
        the commit URL.
    """
    with tempfile.TemporaryDirectory(prefix="ppcl-push-") as tmp:
        folder = addon.save_pretrained(Path(tmp) / "addon")
        card = model_card(addon.manifest(), repo_id=repo_id, license=license)
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
        return upload_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )
