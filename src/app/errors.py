"""User-facing errors: one line that names the problem and the fix; and the one way to shorten any error to a line."""


class UserError(Exception):
    """Bad input (config, data file, missing stage inputs). Reported as one line, exit code 2."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_line(error: BaseException) -> str:
    """``Type: first line`` (the type alone for an empty message): how a failed job or call is reported."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
