"""Give each pin of a wheelhouse requirements file the sha256 of its wheel, checked against
the lock the tests install from.

    python tests/images/pin_hashes.py LOCK HOUSE REQUIREMENTS...

Every pin (``name==version``) of each REQUIREMENTS file must have a wheel in HOUSE; when the
pin is in LOCK (requirements/test.lock, what ``make install`` installs with
``--require-hashes``), the wheel's sha256 must be one of the lock's hashes for it, else this
fails naming the wheel: the images then install the very files the tests ran with. A pin the
lock lacks (a requirement only the base image's older Python has, such as async-timeout) is
hashed as downloaded, and named on stdout. The files are rewritten as
``name==version --hash=sha256:...``, which puts the images' ``pip install`` in hash-checking
mode.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (and wheel file names spell them)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_hashes(lock: Path) -> dict[tuple[str, str], set[str]]:
    """(name, version) -> the hashes the lock allows for that pin."""
    found: dict[tuple[str, str], set[str]] = {}
    current: tuple[str, str] | None = None
    for line in lock.read_text().splitlines():
        pin = PIN.match(line)
        if pin:
            current = (canonical(pin[1]), pin[2])
            found[current] = set()
        if current is not None:
            found[current].update(HASH.findall(line))
    return found


def wheel_hashes(house: Path) -> dict[tuple[str, str], set[str]]:
    """(name, version) -> sha256 of each wheel file of it in the wheelhouse."""
    found: dict[tuple[str, str], set[str]] = {}
    for wheel in house.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        found.setdefault((canonical(name), version), set()).add(digest)
    return found


def hashed(requirements: Path, locked: dict, wheels: dict) -> tuple[list[str], list[str]]:
    """The hashed lines of ``requirements`` and the pins the lock lacks; SystemExit naming
    a pin without a wheel or a wheel whose hash the lock does not allow."""
    lines, unlocked = [], []
    for line in (raw.split()[0] for raw in requirements.read_text().splitlines() if raw.strip()):
        pin = PIN.match(line)
        if not pin:
            raise SystemExit(f"{requirements}: {line!r} is not name==version")
        key = (canonical(pin[1]), pin[2])
        digests = wheels.get(key)
        if not digests:
            raise SystemExit(f"{requirements}: no wheel of {line} in the wheelhouse")
        if key in locked:
            digests &= locked[key]
            if not digests:
                raise SystemExit(
                    f"{requirements}: the wheel of {line} is not the file requirements/test.lock "
                    "pins (its sha256 is none of the lock's): remove it from the wheelhouse "
                    "and fetch it again"
                )
        else:
            unlocked.append(line)
        lines.append(f"{pin[1]}=={pin[2]} " + " ".join(f"--hash=sha256:{d}" for d in digests))
    return lines, unlocked


def main(argv: list[str]) -> int:
    lock, house, *files = (Path(a) for a in argv)
    locked, wheels = lock_hashes(lock), wheel_hashes(house)
    for requirements in files:
        lines, unlocked = hashed(requirements, locked, wheels)
        requirements.write_text("\n".join(lines) + "\n")
        if unlocked:
            print(f"{requirements.name}: not in the lock, hashed as fetched: {' '.join(unlocked)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
