"""Credential rotation's pure parts: login slots, the Secret's record, the ACL rules, and
the one list of permanent reasons."""

from __future__ import annotations

import pytest

from cqrs_operator import status
from cqrs_operator.errors import (
    PERMANENT_REASONS,
    PermanentProvisioningError,
    ProvisioningError,
)
from cqrs_operator.provisioning import acl_rules, password_hash
from cqrs_operator.rotation import (
    RETIRING_ANNOTATION,
    ROTATION_ANNOTATION,
    Credentials,
    Login,
    logins,
    other_login,
    parse,
)

OLD, NEW = "o" * 20, "n" * 20


def test_the_second_login_slot_fits_postgresqls_63_bytes() -> None:
    assert logins("cqrs_a_1234abcd") == ("cqrs_a_1234abcd", "cqrs_a_1234abcd_b")
    first, second = logins("r" * 63)
    assert len(second) == 63 and second != first
    assert other_login(first, second) == first and other_login(first, first) == second


def test_the_secret_records_the_login_and_the_rotation() -> None:
    role, second = logins("cqrs_x_1234abcd")
    legacy = parse(role, {"username": role, "password": OLD}, {})
    assert legacy == Credentials(active=Login(role, OLD)) and not legacy.rotating
    rolling = parse(
        role,
        {"username": second, "password": NEW, "WRITE_DB_URL": "u"},
        {RETIRING_ANNOTATION: role, ROTATION_ANNOTATION: "t1"},
    )
    assert (rolling.phase, rolling.retiring, rolling.token) == ("RotationRollingOut", role, "t1")
    assert rolling.completed().phase == "Current"
    # A login outside the two slots, or a password the operator would not generate: none.
    assert parse(role, {"username": "postgres", "password": OLD}, {}).active is None
    assert parse(role, {"username": role, "password": "short"}, {}).active is None
    preparing = Credentials(active=Login(role, OLD), next=Login(second, NEW), retiring=role)
    assert preparing.accepted == [Login(role, OLD), Login(second, NEW)]
    assert preparing.switched().active == Login(second, NEW)
    assert preparing.switched().retiring == role


def test_acl_rules_drop_a_password_only_outside_a_rotation() -> None:
    old, new = password_hash(OLD), password_hash(NEW)
    mid = acl_rules("s", [NEW], {old}, exact=False)
    assert f"#{new}" in mid and "resetpass" not in mid and "reset" not in mid
    assert "resetpass" not in acl_rules("s", [NEW], {new}, exact=True)  # nothing to change
    done = acl_rules("s", [NEW], {old, new}, exact=True)
    assert done[done.index("resetpass") + 1] == f"#{new}"
    assert all(OLD not in rule and NEW not in rule for rule in done)  # hashes only


def test_one_list_decides_what_is_permanent() -> None:
    for reason in PERMANENT_REASONS:
        assert ProvisioningError(reason, "").permanent
        failed = [{"type": status.DATABASES, "status": "False", "reason": reason}]
        assert status.phase(failed) == "Failed"
    assert not ProvisioningError("DatabaseUnreachable", "").permanent
    with pytest.raises(ValueError):
        PermanentProvisioningError("DatabaseUnreachable", "")


def test_what_starts_a_rotation() -> None:
    from cqrs_operator.reconcile import plan_credentials
    from tests.unit.test_manifests import stack

    spec = stack()
    role, second = logins(spec.role)
    # A new stack gets its role; a value it was created with asks for no rotation.
    fresh, changes = plan_credentials(spec, Credentials(active=None), {}, "v1")
    assert fresh.active is not None and fresh.active.username == role
    assert (fresh.token, fresh.rotating, [c.reason for c in changes]) == (
        "v1",
        False,
        ["CredentialsCreated"],
    )
    same, changes = plan_credentials(spec, fresh, {}, "v1")
    assert same == fresh and changes == []
    rotating, changes = plan_credentials(spec, fresh, {}, "v2")
    assert rotating.next is not None and rotating.next.username == second
    assert rotating.retiring == role and [c.reason for c in changes] == ["RotationStarted"]
    assert plan_credentials(spec, rotating, {}, "v3")[0] == rotating  # one at a time
    # The Secret lost after provisioning: a rotation away from the login the pods hold.
    provisioned = {"credentials": {"login": second}, "databases": {"role": role}}
    lost, changes = plan_credentials(spec, Credentials(active=None), provisioned, "")
    assert lost.next is not None and (lost.next.username, lost.retiring) == (role, second)
    legacy, _ = plan_credentials(spec, Credentials(active=None), {"databases": {"role": role}}, "")
    assert legacy.next is not None and legacy.next.username == second


def test_every_permanent_error_raised_names_a_listed_reason() -> None:
    """A reason raised as permanent but missing from the list raises ValueError at runtime
    (found when the KEDA refusal and the one list met): every literal one is listed."""
    import re
    from pathlib import Path

    from cqrs_operator.errors import PERMANENT_REASONS

    source = "".join(p.read_text() for p in Path("operator/cqrs_operator").glob("*.py"))
    raised = set(re.findall(r'PermanentProvisioningError\(\s*"(\w+)"', source))
    assert raised and raised <= PERMANENT_REASONS, raised - PERMANENT_REASONS


def test_with_credentials_keeps_the_host_every_parser_reads() -> None:
    """The login goes to the URL's host, never to a "@" in its query or fragment."""
    from cqrs_operator.provisioning import with_credentials

    url = with_credentials("redis://old:pw@db.example:6380/0?ssl_cert_reqs=none", "u", "p@ss")
    assert url == "redis://u:p%40ss@db.example:6380/0?ssl_cert_reqs=none"
    assert with_credentials("redis://r.example:6379#@evil:1", "u", "p").endswith("@r.example:6379")
