"""The one exception type for mistakes a user can fix: bad input, impossible settings."""


class UserError(Exception):
    """An error in the user's input or settings; the CLI prints its message and exits with code 2."""
