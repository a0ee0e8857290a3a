"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class FewstepError(ValueError):
    """Bad input (a value, a path, a name): the message names it and says what is allowed."""


def check_choice(name: str, value, allowed) -> None:
    """One-line error for an option outside its allowed values: "unknown NAME 'VALUE'; allowed: A, B"."""
    if value not in allowed:
        raise FewstepError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
