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


class Pruned(Exception):
    """A search's pruner stopped this job's training (``hydra/sweeper/pruner``): not a failure. ``epoch``: the last
    epoch trained; ``history``: every epoch's record (losses, term by term) up to it."""

    def __init__(self, epoch: int, history: list[dict] | None = None) -> None:
        super().__init__(epoch, history or [])  # the arguments, so that it pickles back from a launcher's worker
        self.epoch, self.history = epoch, history or []

    def __str__(self) -> str:
        return f"pruned after epoch {self.epoch}"
