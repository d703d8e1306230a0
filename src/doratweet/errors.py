"""The one exception type for mistakes a user can fix (paths, columns, labels, options).

The CLI prints its message as a single line and exits with status 2; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the file/line/option and what to do."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message ("" if it has none), cut to `limit` characters: libraries' messages
    can run over many lines, and ours are one."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else "")[:limit]
