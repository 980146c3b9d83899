"""The one error type for problems a user can fix.

Raise `UsageError("what is wrong; how to fix it")`. The CLI and the recipes print
it as one line and exit with status 2 (no traceback unless --debug). Bugs are
ordinary exceptions and keep their tracebacks.
"""


class UsageError(Exception):
    """A problem with the user's input (config, paths, flags), with the fix in its message."""
