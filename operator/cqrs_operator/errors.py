"""The operator's one error type: what failed, as a reason a person can grep, and a message.

``permanent`` errors cannot succeed without a change (of the spec, a Secret, another stack):
the stack's phase says Failed. Everything else is transient trouble (a server down): Degraded,
retried with back-off.
"""

from __future__ import annotations

# Reasons that need a change of the spec or of what it names (a Secret, another stack's
# object, the image): phase Failed, and no retry with back-off. The one list: an error is
# permanent when its reason is here, and a condition's reason makes the phase Failed.
PERMANENT_REASONS = frozenset(
    {
        "InvalidSpec",
        "MigrationJobFailed",  # retried once the Job is deleted (by hand, or by its TTL)
        "OwnedByAnotherStack",
        "NotOwned",
        "AdoptionNotAllowed",
        "ChildNotOwned",
        "SecretNotOptedIn",
        "CaInvalid",
        "RedisTlsMismatch",
        "AdminSecretNotOptedIn",
        "AdminSecretInvalid",
        "AdminHostNotAllowed",
        "AdminHostsRequired",
        "AdminSecretWrongKind",
        "ReservedName",
        "RedisDatabaseNotZero",
        "RedisUrlInvalid",
        "RedisSecretInvalid",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "KedaNotInstalled",
        "MigrationJobNotOurs",
        "ApplyInvalid",  # a Deployment of the spec refused by the API server (HTTP 422)
    }
)


class ProvisioningError(Exception):
    """A step failed for a reason outside the operator (unreachable server, refused login)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def permanent(self) -> bool:
        return self.reason in PERMANENT_REASONS


class PermanentProvisioningError(ProvisioningError):
    """A failure that retrying alone will not fix; its reason is one of PERMANENT_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in PERMANENT_REASONS:
            raise ValueError(f"{reason} is not listed in PERMANENT_REASONS")
        super().__init__(reason, message)
