"""Outputs that never destroy an input: a path check every tool runs before writing, and a temporary-file
writer for the outputs written by path (videos), as ``atomic_write`` is for the ones written by stream.
"""

import contextlib
import os
import secrets

from .errors import ConfigError

__all__ = ["atomic_output_path", "refuse_output_onto_inputs"]


def _same_file(a, b):
    """Whether paths `a` and `b` are one file: equal once resolved (symlinks, `..`, `dir/` forms), or the
    same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def refuse_output_onto_inputs(output, inputs, into_folder=False, option="--output"):
    """Raise ConfigError (naming both paths) when writing `output` would replace one of `inputs`.

    `into_folder`: `output` is a folder the tool writes into under the inputs' base names, so an input that
    lies in that folder is refused too (`--input dir --output dir/`).
    """
    if not output:
        return
    for source in inputs:
        if not source or "://" in str(source):
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
    """Yield a temporary path next to `path` with the same extension (writers such as cv2.VideoWriter pick
    the format from it); when the block exits cleanly it is renamed over `path`, otherwise removed, so
    `path` is either its old content or the complete new one."""
    directory, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    tmp_path = os.path.join(directory, f".{stem}.{secrets.token_hex(4)}.tmp{extension}")
    try:
        yield tmp_path
        if os.path.exists(tmp_path):  # a writer that wrote nothing leaves no file: nothing to put in place
            os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
