"""Errors raised by service functions; the API turns each into its status code and detail."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404


class PolicyDenied(ServiceError):
    """Quota, role or availability-window policy forbids this."""

    status_code = 403


class Conflict(ServiceError):
    """The request is valid but the current state does not allow it."""

    status_code = 409
