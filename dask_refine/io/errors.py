"""The one error type for bad user input: it names the file, field or particle and what was expected."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, reported to the user as one clear line (the CLI exits with status 2).

    ``where`` names the file (and field/particle) at fault; the message says what was found and
    what was expected.
    """

    def __init__(self, where: str, message: str):
        self.where = str(where)
        self.message = message
        super().__init__(f"{self.where}: {message}")
