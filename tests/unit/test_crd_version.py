"""The release comparison that decides whether the operator may apply its CRD over the live one."""

from __future__ import annotations

import pytest

from cqrs_operator import __version__, schema
from cqrs_operator.kube import crd_is_newer, crd_version, version_key


def test_the_generated_crd_names_the_package_version() -> None:
    assert crd_version(schema.crd()) == __version__


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("0.9.0", "0.10.0"),  # numbers, not strings
        ("0.1.0", "0.1.1"),
        ("1.0.0-rc.1", "1.0.0"),  # a pre-release sorts before its release
        ("1.0.0-rc.2", "1.0.0-rc.10"),
        ("v1.9", "1.10.0"),
    ],
)
def test_versions_compare_as_releases(lower: str, higher: str) -> None:
    assert version_key(lower) < version_key(higher)  # type: ignore[operator]
    assert crd_is_newer(higher, lower)
    assert not crd_is_newer(lower, higher)


def test_equal_unannotated_and_unreadable_versions() -> None:
    assert version_key("1.2") == version_key("1.2.0")
    assert not crd_is_newer("0.1.0", "0.1.0")  # the same release is applied again
    assert not crd_is_newer(None, "0.1.0")  # a live CRD from before the annotation is older
    assert version_key("latest") is None
    assert crd_is_newer("latest", "0.1.0")  # not proven older: left alone
