"""The one error type for things a person must fix (unknown model, bad layer, unusable data...)."""

from __future__ import annotations


class SpkdError(Exception):
    """A user-facing error: a stable `code`, a message a person can act on, and the spec field."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"{self.code}{where}: {self.message}"
