"""``ppcl push``: upload an add-on or merged-model folder to the Hugging Face Hub, with a card that loads it by id.

The one verb that uses the network. The folder is uploaded as it is, in one commit, except its ``README.md``, which is
regenerated so its snippet loads the Hub repo (and carries ``--license``); the folder itself is not changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("push", help="upload an add-on or merged folder to the Hub (the only verb that goes online)")
    p.add_argument("folder", help="an add-on folder (ppcl distill: OUT/addon) or a merged folder (ppcl merge)")
    p.add_argument("--repo", required=True, help="Hub model repo id, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument(
        "--license", default=None, help="the card's licence, e.g. apache-2.0 (the base's terms usually apply)"
    )
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--message", default="Upload with ppcl", help="commit message")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.errors import ArtefactError, ConfigError
    from ppcl.hub import is_hub_id, upload_with_card

    if "/" not in args.repo or not is_hub_id(args.repo):
        raise ConfigError(
            "--repo is not a Hub repo id",
            expected="owner/name",
            found=repr(args.repo),
            fix="pass e.g. --repo me/qwen-image-ppcl",
        )
    folder = Path(args.folder)
    card = _card(folder, args.repo, args.license)
    if card is None:
        raise ArtefactError(
            f"{folder} is not a ppcl add-on or merged folder",
            expected="ppcl_addon.json (an add-on) or ppcl_blocks.json (a merged model)",
            found="neither" if folder.is_dir() else "no such folder",
            fix="pass OUT/addon of `ppcl distill` or the OUT of `ppcl merge`",
        )
    url = upload_with_card(
        folder,
        args.repo,
        card,
        private=True if args.private else None,
        revision=args.revision,
        commit_message=args.message,
        create_pr=args.create_pr,
    )
    print(url)
    return 0


def _card(folder: Path, repo_id: str, license: str | None) -> str | None:
    from ppcl.addon.card import model_card
    from ppcl.addon.manifest import ADDON_FILE
    from ppcl.io import read_json
    from ppcl.runtime.block_map import saved_path
    from ppcl.runtime.merge_width import folder_card

    if (folder / ADDON_FILE).is_file():
        return model_card(read_json(folder / ADDON_FILE, "add-on manifest"), repo_id=repo_id, license=license)
    if saved_path(folder) is not None and (folder / "config.json").is_file():
        return folder_card(folder, repo_id, license)
    return None
