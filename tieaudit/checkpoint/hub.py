"""PATH as a Hub repo id: resolved offline, from the local Hugging Face cache only (never the network).

A local path always wins (as in transformers' `from_pretrained`): a repo id is looked up only when nothing
exists at PATH. The lookup goes through `huggingface_hub.snapshot_download(local_files_only=True)`, so the
cache location (`HF_HUB_CACHE`, `HF_HOME`), refs (`main`, tags) and commit hashes are resolved exactly as
transformers would, and a snapshot the cache knows to be incomplete is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tieaudit.errors import InputError, UsageError
from tieaudit.model import HubRef

# a Hub model repo id `org/name` (letters, digits, `-`, `_`, `.`; no `--`/`..`, not starting with `.`); a bare
# `name` is read as a local path only, so a mistyped directory is not looked up in the cache
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
REPO_ID = re.compile(rf"{_PART}/{_PART}")


@dataclass(frozen=True)
class Resolved:
    """Where a PATH argument lives: the directory to read, and the repo it came from (None: a local path)."""

    path: str
    repo: HubRef | None = None


_CACHE_REPO = re.compile(r"(models|datasets|spaces)--[^/]+")


def is_cache_snapshot(root: Path) -> bool:
    """Whether ``root`` is a snapshot of a Hugging Face cache, recognised by its structure
    (``<cache>/models--ORG--NAME/snapshots/<revision>``) whether its files are symlinks into ``blobs/`` or copies
    (caches on filesystems without symlinks, ``hf download --local-dir`` style copies moved into a cache)."""
    parent = root.parent
    if parent.name != "snapshots":
        return False
    return bool(_CACHE_REPO.fullmatch(parent.parent.name)) or parent.parent.joinpath("blobs").is_dir()


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".")


def resolve(path: str | os.PathLike[str], revision: str | None = None) -> Resolved:
    """A local directory as is; otherwise a repo id from the local cache (InputError when it is not there)."""
    text = os.fspath(path)
    if revision is not None and (not revision.strip() or not revision.isprintable()):
        raise UsageError(f"--revision {revision!r} is not a branch, tag or commit name")
    if os.path.lexists(text):
        if revision is not None:
            raise UsageError(f"--revision applies to Hub repo ids; {text} is a local path")
        return Resolved(text)
    if not looks_like_repo_id(text):
        if revision is not None:
            raise UsageError(f"--revision applies to Hub repo ids; {text!r} is not one")
        return Resolved(text)  # open_checkpoint reports the missing path
    return Resolved(*cached_snapshot(text, revision))


def cached_snapshot(repo_id: str, revision: str | None) -> tuple[str, HubRef]:
    """The snapshot directory of `repo_id` at `revision` (default main) in the local cache, and its HubRef;
    InputError with the reason (not cached, incomplete, unreadable) otherwise. Never downloads."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise InputError(f"path does not exist: {repo_id} (and huggingface_hub is not installed)") from None
    rev = revision or "main"
    try:
        folder = snapshot_download(repo_id, revision=rev, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        if type(exc).__name__ != "IncompleteSnapshotError":  # huggingface_hub >= 1.x says so; older ones cannot
            entry = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
            if entry.is_dir() and not os.access(entry / "refs", os.R_OK | os.X_OK):
                raise InputError(
                    f"{repo_id}: cannot read its entry in the local Hugging Face cache ({entry}): permission denied"
                ) from None
            where = f"revision {rev} of " if revision else ""
            raise InputError(
                f"path does not exist: {repo_id} (nor is {where}{repo_id} in the local Hugging Face cache at "
                f"{constants.HF_HUB_CACHE}; tieaudit never downloads: `hf download {repo_id}{_rev_flag(revision)}`)"
            ) from None
        raise InputError(
            f"{repo_id}@{rev}: the cached snapshot is incomplete ({_first_sentence(str(exc))}); "
            f"complete it with `hf download {repo_id}{_rev_flag(revision)}`"
        ) from None
    except (OSError, ValueError) as exc:  # an unreadable cache, an invalid revision name
        raise InputError(f"{repo_id}@{rev}: cannot read the local Hugging Face cache: {exc}") from None
    commit = Path(folder).name
    return folder, HubRef(repo_id=repo_id, revision=rev, commit=commit)


def _rev_flag(revision: str | None) -> str:
    return f" --revision {revision}" if revision else ""


def _first_sentence(text: str) -> str:
    missing = re.search(r"(\d+ file\(s\) are missing \([^)]*\))", text)
    return missing.group(1) if missing else " ".join(text.split())[:200]
