"""Errors a user can cause. The CLI prints them on one line and exits with code 2 (no traceback)."""


class MedstateError(Exception):
    """A problem with the user's input (path, file, record, option). The message names it and the fix."""
