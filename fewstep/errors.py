"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class FewstepError(ValueError):
    """Bad input (a value, a path, a name): the message names it and says what is allowed."""
