"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
    """Bad input (config, data file, missing stage inputs). Reported as one line, exit code 2."""
