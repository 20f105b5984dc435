"""The one exception type that reaches the user as a single line (see cli.main)."""


class UserError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""
