"""SRC given as a Hugging Face repo id (`meituan-longcat/LongCat-Video`): resolve it to a local snapshot.

Online, only the folders a conversion reads are downloaded; offline (HF_HUB_OFFLINE=1, or no network)
the local cache is used as is. Anything that looks like a path is a path, never a repo id.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from .core.errors import LongcatError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
NEEDED = ["dit/*", "transformer/*", "lora/*", "lora/*/*", "text_encoder/*", "tokenizer/*", "vae/*", "scheduler/*",
          "model_index.json"]


def looks_like_repo_id(text: str) -> bool:
    """`owner/name` whose path does not exist and whose parent folder does not exist either.

    `./x/y`, `/x/y`, `~/x/y` are never repo ids (REPO_ID cannot start with `.`, `/` or `~`), and
    `weights/LongCat-Video` is a path as soon as `weights/` exists."""
    if not REPO_ID.match(text):
        return False
    path = Path(text)
    return not path.exists() and not path.parent.exists()


def download_command(repo_id: str, local_dir: str, scripts: set[str] | None = None) -> str:
    """How to download a repo with the installed huggingface-hub: `hf` (1.0 on), `huggingface-cli` (older),
    or its Python API when neither command is installed."""
    scripts = _hub_scripts() if scripts is None else scripts
    if "hf" in scripts:
        return f"hf download {repo_id} --local-dir {local_dir}"
    if "huggingface-cli" in scripts:
        return f"huggingface-cli download {repo_id} --local-dir {local_dir}"
    return (f"python -c \"from huggingface_hub import snapshot_download; "
            f"snapshot_download('{repo_id}', local_dir='{local_dir}')\"")


def _hub_scripts() -> set[str]:
    try:
        entry_points = importlib.metadata.distribution("huggingface_hub").entry_points
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {entry.name for entry in entry_points if entry.group == "console_scripts"}


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A Path, or text that looks like a path, is returned as a Path; a repo id becomes the path of its
    (possibly downloaded) snapshot."""
    if isinstance(src, Path) or not looks_like_repo_id(src):
        return Path(src)
    text = src
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # read at call time: huggingface_hub freezes these when it is first imported
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=NEEDED, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except LocalEntryNotFoundError:
        local = f"weights/{text.split('/')[1]}"
        raise LongcatError("is neither a local folder nor a Hugging Face repo in the local cache or reachable on "
                           "the hub", text, f"if it is a folder, check the path; if it is a hub repo, download it "
                           f"first: {download_command(text, local)}, then pass {local}") from None
    except Exception as exc:  # network, auth or not-found errors from the hub client
        raise LongcatError(f"could not fetch {text!r} from the hub: {exc.__class__.__name__}: {exc}", text,
                           "check the repo id and your network, or pass a local folder") from None
