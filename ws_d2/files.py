"""Files in and out: URLs told from paths, inputs checked once, outputs that never destroy an input."""

import contextlib
import os
import secrets

from .errors import CheckpointError, ConfigError

__all__ = [
    "atomic_output_path",
    "atomic_write",
    "is_url",
    "refuse_output_onto_inputs",
    "require_weights_file",
]


def is_url(path) -> bool:
    return "://" in str(path)


def require_weights_file(weights, key="MODEL.WEIGHTS"):
    """Refuse (CheckpointError) a local weights path that is not a file; a URL or '' passes."""
    if weights and not is_url(weights) and not os.path.isfile(weights):
        raise CheckpointError(f"{key} file not found: {weights}")


def _same_file(a, b):
    # equal once resolved (symlinks, `..`, `dir/` forms), or one inode (a hard link)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def refuse_output_onto_inputs(output, inputs, into_folder=False, option="--output"):
    """Raise ConfigError (naming both paths) when writing `output` would replace one of `inputs`.
    `into_folder`: `output` is a folder written under the inputs' base names, so an input in it is refused too."""
    if not output:
        return
    for source in inputs:
        if not source or is_url(source):
            continue
        if _same_file(output, source):
            raise ConfigError(f"{option} {output} is the input {source}: refusing to overwrite an input")
        if into_folder and _same_file(os.path.dirname(os.path.realpath(source)), output):
            raise ConfigError(
                f"{option} {output} holds the input {source}: refusing to overwrite it with its drawing, "
                "write into another folder"
            )


@contextlib.contextmanager
def atomic_output_path(path):
    """A temporary path next to `path`, with its extension (writers like cv2.VideoWriter pick the format from
    it), renamed over `path` when the block exits cleanly and removed otherwise: `path` is old or complete."""
    directory, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    tmp_path = os.path.join(directory, f".{stem}.{secrets.token_hex(4)}.tmp{extension}")
    try:
        yield tmp_path
        if os.path.exists(tmp_path):  # a writer that wrote nothing leaves nothing to put in place
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """`atomic_output_path`, opened: a reader (or a process killed mid-write) sees the old file or the new."""
    with atomic_output_path(path) as tmp_path:
        with open(tmp_path, mode) as f:
            yield f
            f.flush()
