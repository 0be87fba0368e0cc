"""Checkpoints by URL: downloaded once into detectron2's file cache, refused and evicted if unreadable.

The download and the cache are detectron2's ``PathManager`` (iopath): files go under ``$FVCORE_CACHE``
(default ``~/.torch/iopath_cache``), named after the URL's path, and a later load of the same URL reads the
cached file without a request. iopath writes to ``<file>.tmp`` and renames it only after a complete
transfer (a transfer cut short raises), so a half-written download is never read. A cached file that then
fails to load safely (truncated or corrupt at the source, or refused as unsafe) is deleted, so the next
load fetches it again instead of failing on the same bytes.
"""

import contextlib
import os

from ..errors import CheckpointError, one_line

__all__ = ["discard_download", "fetch_checkpoint", "is_url"]


def is_url(path) -> bool:
    return "://" in str(path)


def fetch_checkpoint(url, path_manager) -> str:
    """The local (cached) path of the checkpoint at `url`, downloaded through `path_manager` if not cached."""
    try:
        local = path_manager.get_local_path(url)
    except (OSError, ValueError) as e:  # URLError, HTTPError, ContentTooShortError, refused connection...
        raise CheckpointError(f"{url}: cannot download the checkpoint: {one_line(e)}") from None
    if not os.path.isfile(local):
        raise CheckpointError(f"{url}: the download left no file at {local}")
    return local


def discard_download(url, local, error):
    """Delete the cached copy `local` of `url` that failed to load with `error`; the same error type, naming
    the URL and saying the copy is gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local)
    return type(error)(f"{url}: {one_line(error)} (the downloaded copy was deleted from the cache)")
