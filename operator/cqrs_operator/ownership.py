"""Ownership markers on external objects (pure): who may alter or drop a database, role, stream.

Every database and role the operator creates carries ``COMMENT ON ... IS '<marker>'``; every
stream has an owner key ``<stream>:owner`` holding one. A marker names the stack's UID and
whether the stack created the object or adopted it (``spec.adopt: true`` on an unmarked
object). A stack alters only objects marked with its own UID and drops only those it created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PermanentProvisioningError

CREATED = "created"
ADOPTED = "adopted"
_UID = re.compile(r"^[0-9a-zA-Z-]{1,64}$")
_MARKER = re.compile(r"^cqrs\.dev/stack=(?P<uid>[0-9a-zA-Z-]{1,64});origin=(?P<origin>\w+)$")


@dataclass(frozen=True)
class Marker:
    uid: str
    origin: str  # CREATED or ADOPTED

    def text(self) -> str:
        """The marker as stored (a comment or the owner key's value); SQL-literal safe."""
        if not _UID.match(self.uid) or self.origin not in (CREATED, ADOPTED):
            raise ValueError(f"not a valid owner marker: uid={self.uid!r} origin={self.origin!r}")
        return f"cqrs.dev/stack={self.uid};origin={self.origin}"


def parse_marker(text: str | bytes | None) -> Marker | None:
    """The marker in ``text``, or None when the object carries none (a foreign comment too)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    match = _MARKER.match((text or "").strip())
    return Marker(match["uid"], match["origin"]) if match else None


class OwnershipRefused(PermanentProvisioningError):
    """An object this stack may not touch; ``reason`` is OwnedByAnotherStack or NotOwned."""


def claim(what: str, marker: Marker | None, uid: str, adopt: bool) -> Marker | None:
    """Decide about an existing object: None if it is already this stack's, else the marker
    to write (adoption); raise OwnershipRefused when the stack must leave it alone."""
    if marker is not None:
        if marker.uid == uid:
            return None
        raise OwnershipRefused(
            "OwnedByAnotherStack", f"{what} belongs to another CqrsStack (uid {marker.uid})"
        )
    if not adopt:
        raise OwnershipRefused(
            "NotOwned",
            f"{what} exists and carries no CqrsStack owner marker; set spec.adopt: true to "
            "use it (an adopted object is never dropped)",
        )
    return Marker(uid, ADOPTED)


def may_drop(marker: Marker | None, uid: str) -> bool:
    """deletionPolicy Delete drops only what this stack created."""
    return marker is not None and marker.uid == uid and marker.origin == CREATED
