"""ws_d2's exceptions, each a one-line message naming the file, key or value at fault, and the one-line error
every tool prints: exit 0 on success, 1 when an input is refused or a step fails, 2 on a usage error."""

import functools
import sys

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "UnsafeCheckpointError", "WSD2Error"]


class WSD2Error(Exception):
    """Bad input to ws_d2, with a one-line message naming it."""


class ConfigError(WSD2Error, ValueError):
    """A config that cannot run as given: bad file or key, a batch that does not divide, a missing device."""


class DatasetError(WSD2Error, ValueError):
    """A data set that is not registered, missing on disk, malformed, or does not fit the config."""


class CheckpointError(WSD2Error):
    """A checkpoint that is missing, truncated, corrupt, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that asks to call or build something other than plain data: refused unread."""


def one_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    # a KeyError's str() is its repr; yacs puts the message of an unknown key in its args
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def command_line(tool: str):
    """Decorate a tool's `main(argv=None) -> int`: a WSD2Error or OSError it raises becomes `tool: error: <line>`
    on stderr and the return value 1 (argparse's usage errors still exit 2)."""

    def decorate(main):
        @functools.wraps(main)
        def main_with_errors(*args, **kwargs):
            try:
                return main(*args, **kwargs) or 0
            except (WSD2Error, OSError) as e:
                print(f"{tool}: error: {one_line(e)}", file=sys.stderr)
                return 1

        return main_with_errors

    return decorate
