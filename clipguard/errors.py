"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class ClipguardError(Exception):
    """A problem with the user's input or environment that a person can fix.

    The message names the bad value and, where possible, the fix.
    """

    exit_code = 2
