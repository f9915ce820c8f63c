"""The event that travels through the stream: one per command, encoded as flat stream fields."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

RECORD_CREATED = "RecordCreated"
RECORD_UPDATED = "RecordUpdated"
EVENT_TYPES = (RECORD_CREATED, RECORD_UPDATED)


class MalformedEvent(ValueError):
    """A stream entry that cannot be an event of ours (a poison message)."""


@dataclass(frozen=True, slots=True)
class Command:
    """A stored command, as the write DB holds it and the projector applies it."""

    position: int
    key: str
    value: str
    event_type: str
    created_at: datetime


def encode(command: Command) -> dict[str, str]:
    """Return the stream fields of a command's event."""
    return {
        "type": command.event_type,
        "position": str(command.position),
        "key": command.key,
        "value": command.value,
        "created_at": command.created_at.isoformat(),
    }


def decode(fields: dict[bytes, bytes] | dict[str, str]) -> Command:
    """Return the command carried by stream ``fields``; raise MalformedEvent if it is not one."""
    try:
        data = {_text(k): _text(v) for k, v in fields.items()}
        event_type = data["type"]
        position = int(data["position"])
        created_at = datetime.fromisoformat(data["created_at"])
        command = Command(position, data["key"], data["value"], event_type, created_at)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"not a cqrs-stack event: {exc!r}") from exc
    if event_type not in EVENT_TYPES or position <= 0 or created_at.tzinfo is None:
        raise MalformedEvent(f"invalid event: type={event_type!r} position={position}")
    if "\x00" in command.key or "\x00" in command.value:
        raise MalformedEvent("NUL byte in key or value")
    return command


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
