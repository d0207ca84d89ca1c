"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class ClipguardError(Exception):
    """A problem with the user's input or environment that a person can fix.

    The message names the bad value and, where possible, the fix.
    """

    exit_code = 2


def check_positive(name: str, value: int | None, what: str = "a positive integer") -> None:
    """``value`` (when given) must be >= 1: ``--limit 0`` is a one-line error naming the option."""
    if value is not None and value < 1:
        raise ClipguardError(f"{name} {value} must be {what}")
