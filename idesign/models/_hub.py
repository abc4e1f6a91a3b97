"""Where a checkpoint's files come from: a local directory, or a Hugging Face hub snapshot
(:func:`resolve_checkpoint`), and whether the hub can be reached (:func:`hub_reachable`). Re-exported by
:mod:`idesign.models.importers`."""

from __future__ import annotations

import os
import pathlib
import socket

# Files a hub download needs; weights in other formats (.bin, .h5, .msgpack) are never fetched.
_HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached: False at once when ``HF_HUB_OFFLINE`` is set.

    Args:
      timeout: seconds to wait for a TCP connection.

    Returns:
      True if a connection to the hub opened within ``timeout``.

    >>> import os, idesign as ids
    >>> saved = os.environ.get("HF_HUB_OFFLINE"); os.environ["HF_HUB_OFFLINE"] = "1"
    >>> ids.models.importers.hub_reachable()
    False
    >>> _ = os.environ.pop("HF_HUB_OFFLINE") if saved is None else os.environ.update(HF_HUB_OFFLINE=saved)
    """
    if _hub_offline():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(checkpoint: str | os.PathLike, *, revision: str | None = None) -> pathlib.Path:
    """A local directory for a checkpoint: the directory itself, or a hub snapshot (downloaded if needed).

    Only the files an import needs are fetched (``config.json``, ``*.safetensors``, the tokenizer
    files). With ``HF_HUB_OFFLINE=1`` only the local cache is consulted.

    Args:
      checkpoint: a local directory, or a hub id (``'openai-community/gpt2'``, ``'HuggingFaceTB/SmolLM-135M'``).
      revision: a hub branch, tag or commit.

    Returns:
      The directory's path.

    Raises:
      FileNotFoundError: a local-looking path that does not exist.
      OSError: a hub id that could not be fetched (offline, unknown id, no network); the message says which.

    >>> import tempfile, idesign as ids
    >>> d = tempfile.mkdtemp()
    >>> str(ids.models.importers.resolve_checkpoint(d)) == d
    True
    """
    path = pathlib.Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    text = str(checkpoint)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise FileNotFoundError(f"checkpoint {text!r} is not a directory; expected a directory with config.json "
                                "and *.safetensors, or a hub id such as 'openai-community/gpt2'.")
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_FILES,
                                              local_files_only=_hub_offline()))
    except Exception as e:  # the hub client raises many kinds; all mean "could not get it"
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if _hub_offline()
               else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise OSError(f"could not get {text!r} from the Hugging Face hub ({why}). Pass a local directory with "
                      "config.json and *.safetensors instead, or run where the hub is reachable.") from e
