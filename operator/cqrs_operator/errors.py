"""The operator's one error type: what failed, as a reason a person can grep, and a message.

``permanent`` errors cannot succeed without a change (of the spec, a Secret, another stack):
the stack's phase says Failed. Everything else is transient trouble (a server down): Degraded,
retried with back-off.
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """A step failed for a reason outside the operator (unreachable server, refused login)."""

    permanent = False

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class PermanentProvisioningError(ProvisioningError):
    """A failure that retrying alone will not fix."""

    permanent = True
