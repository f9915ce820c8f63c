"""The wheelhouse's pins get their wheels' hashes, checked against the lock
(tests/images/pin_hashes.py): an image installs the files the tests ran with."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.images import pin_hashes


def wheelhouse(tmp_path: Path, wheels: dict[str, bytes]) -> Path:
    house = tmp_path / "house"
    house.mkdir()
    for name, content in wheels.items():
        (house / name).write_bytes(content)
    return house


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def lock(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test.lock"
    path.write_text(text)
    return path


def test_pins_get_the_hash_the_lock_allows_and_unlocked_pins_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    house = wheelhouse(
        tmp_path,
        {"PyYAML-6.0.4-cp311-x.whl": b"yaml", "async_timeout-5.0.1-py3-none-any.whl": b"at"},
    )
    locked = lock(
        tmp_path,
        f"pyyaml==6.0.4 \\\n    --hash=sha256:{sha(b'other-platform')} \\\n"
        f"    --hash=sha256:{sha(b'yaml')}\n    # via cqrs-stack\n",
    )
    requirements = tmp_path / "requirements-services.txt"
    requirements.write_text("PyYAML==6.0.4\nasync-timeout==5.0.1\n")
    assert pin_hashes.main([str(locked), str(house), str(requirements)]) == 0
    assert requirements.read_text().splitlines() == [
        f"PyYAML==6.0.4 --hash=sha256:{sha(b'yaml')}",
        f"async-timeout==5.0.1 --hash=sha256:{sha(b'at')}",
    ]
    assert "not in the lock, hashed as fetched: async-timeout==5.0.1" in capsys.readouterr().out
    # Run again over its own output: the same lines.
    pin_hashes.main([str(locked), str(house), str(requirements)])
    assert requirements.read_text().startswith(f"PyYAML==6.0.4 --hash=sha256:{sha(b'yaml')}\n")


def test_a_wheel_that_is_not_the_locked_file_is_refused(tmp_path: Path) -> None:
    house = wheelhouse(tmp_path, {"PyYAML-6.0.4-cp311-x.whl": b"tampered"})
    locked = lock(tmp_path, f"pyyaml==6.0.4 \\\n    --hash=sha256:{sha(b'yaml')}\n")
    requirements = tmp_path / "requirements-services.txt"
    requirements.write_text("PyYAML==6.0.4\n")
    with pytest.raises(SystemExit, match=r"PyYAML==6\.0\.4 is not the file requirements/test"):
        pin_hashes.main([str(locked), str(house), str(requirements)])


def test_a_pin_without_a_wheel_is_refused(tmp_path: Path) -> None:
    house = wheelhouse(tmp_path, {})
    requirements = tmp_path / "requirements-services.txt"
    requirements.write_text("redis==8.1.0\n")
    with pytest.raises(SystemExit, match=r"no wheel of redis==8\.1\.0"):
        pin_hashes.main([str(lock(tmp_path, "")), str(house), str(requirements)])
