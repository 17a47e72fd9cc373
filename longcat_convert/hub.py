"""SRC given as a Hugging Face repo id (`meituan-longcat/LongCat-Video`): resolve it to a local snapshot.

Online, only the folders a conversion reads are downloaded; offline (HF_HUB_OFFLINE=1, or no network)
the local cache is used as is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import LongcatError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
NEEDED = ["dit/*", "transformer/*", "lora/*", "lora/*/*", "text_encoder/*", "tokenizer/*", "vae/*", "scheduler/*",
          "model_index.json"]


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not Path(text).exists()


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A local path is returned as is; a repo id becomes the path of its (possibly downloaded) snapshot."""
    text = str(src)
    if not looks_like_repo_id(text):
        return Path(text)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # read at call time: huggingface_hub freezes these when it is first imported
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=NEEDED, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except LocalEntryNotFoundError:
        raise LongcatError(f"{text!r} is not a local folder, and it is neither in the Hugging Face cache nor "
                           "reachable on the hub", text,
                           f"download it first: huggingface-cli download {text} --local-dir weights/{text.split('/')[1]}"
                           ) from None
    except Exception as exc:  # network, auth or not-found errors from the hub client
        raise LongcatError(f"could not fetch {text!r} from the hub: {exc.__class__.__name__}: {exc}", text,
                           "check the repo id and your network, or pass a local folder") from None
