"""The one error type for problems a user can fix.

Raise `UsageError("what is wrong; how to fix it")`. The CLI and the recipes print
it as one line and exit with status 2 (no traceback unless --debug). Bugs are
ordinary exceptions and keep their tracebacks.
"""


class UsageError(Exception):
    """A problem with the user's input (config, paths, flags), with the fix in its message."""


def read_settings_text(path, what: str, fix: str) -> str:
    """The text of a settings file (YAML, JSON), or one UsageError line naming `what` and `fix` if it
    is missing or not UTF-8 text."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}; {fix}")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text; {fix}") from None
