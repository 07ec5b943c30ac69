"""The one exception type for user-facing problems: its message is a single line that says what to fix."""


class DretError(Exception):
    """Bad input (files, configs, flags): entry points print the message alone and exit 2."""
