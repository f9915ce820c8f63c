"""Credential rotation as data (pure): which logins and passwords a stack's servers accept.

PostgreSQL holds one password per role, so a stack has two login slots: its role ``R``
(which owns the databases and every object in them) and ``R_b``, a member of ``R`` whose
sessions run as ``R`` (``ALTER ROLE R_b SET role = R``), so objects stay owned by ``R``
whichever slot logs in. A stack provisioned before rotation existed simply uses slot ``R``.

A rotation moves the pods to the other slot with a new password, in steps recorded in the
stack's credentials Secret (so a restart anywhere finds them again):

1. ``Preparing``: the new login and password are stored under ``next-username`` and
   ``next-password``; the operator sets them on both PostgreSQL servers and adds the password
   to the Redis ACL user, which then holds two passwords.
2. ``RollingOut``: the Secret's ``username``/``password`` and URLs switch to the new login
   (the config hash changes: one rolling restart); the annotation ``cqrs.dev/retiring-login``
   names the old login, still accepted.
3. Once every Deployment has rolled out (from its status), the old login is revoked
   (``NOLOGIN``, no password, its sessions ended), the ACL user keeps only the new password,
   and the annotation goes.

Redis has one user whose passwords are a set: outside a rotation it is exactly the current
one; during a rotation passwords are only ever added, so no reconcile drops one in use.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import manifests
from .spec import StackSpec

# Set on the CqrsStack to any new value to rotate its credentials once per value.
ROTATE_ANNOTATION = "cqrs.dev/rotate-credentials"
# On the credentials Secret: the value of the last rotation started, and the login to revoke.
ROTATION_ANNOTATION = "cqrs.dev/rotation"
RETIRING_ANNOTATION = "cqrs.dev/retiring-login"
NEXT_USERNAME, NEXT_PASSWORD = "next-username", "next-password"
SECOND_LOGIN_SUFFIX = "_b"

PREPARING, ROLLING_OUT, CURRENT = "RotationPreparing", "RotationRollingOut", "Current"
_PASSWORD = re.compile(r"^[A-Za-z0-9_-]{16,200}$")


def check_password(password: str) -> str:
    """Return a generated password (URL-safe alphabet only, 16..200 characters) or raise."""
    if not _PASSWORD.match(password):
        raise ValueError("password must be 16..200 URL-safe characters")
    return password


def logins(role: str) -> tuple[str, str]:
    """The stack's two login slots: its role and the role's member ``<role>_b``."""
    return role, role[: 63 - len(SECOND_LOGIN_SUFFIX)] + SECOND_LOGIN_SUFFIX


def other_login(role: str, login: str) -> str:
    first, second = logins(role)
    return second if login == first else first


@dataclass(frozen=True)
class Login:
    """A PostgreSQL or Redis login."""

    username: str
    password: str


@dataclass(frozen=True)
class Credentials:
    """What the credentials Secret records: the pods' login, a rotation's state."""

    active: Login | None
    next: Login | None = None
    retiring: str | None = None  # the login still accepted until the rollout completes
    token: str = ""  # the ROTATE_ANNOTATION value of the last rotation started
    has_urls: bool = False  # the Secret already carries the URLs built from ``active``

    @property
    def rotating(self) -> bool:
        return self.next is not None or self.retiring is not None

    @property
    def phase(self) -> str:
        if self.next is not None:
            return PREPARING
        return ROLLING_OUT if self.retiring is not None else CURRENT

    @property
    def accepted(self) -> list[Login]:
        """The logins the servers must accept now (the retiring one is left as it is)."""
        return [login for login in (self.active, self.next) if login is not None]

    @property
    def current(self) -> Login:
        """The login the operator itself uses (migrations): the pods', else the next one."""
        login = self.active or self.next
        assert login is not None  # plan() always leaves one
        return login

    def switched(self) -> Credentials:
        """Step 2: the pods move to the next login; the old one is retired after the rollout."""
        assert self.next is not None
        retiring = self.retiring or (self.active.username if self.active else None)
        return replace(self, active=self.next, next=None, retiring=retiring, has_urls=True)

    def completed(self) -> Credentials:
        return replace(self, next=None, retiring=None)


def parse(
    role: str, data: Mapping[str, str] | None, annotations: Mapping[str, str] | None
) -> Credentials:
    """The Secret's record; a login outside the two slots or a bad password counts as none."""
    data, annotations = data or {}, annotations or {}
    slots = logins(role)

    def login(user_key: str, password_key: str) -> Login | None:
        user, password = data.get(user_key, ""), data.get(password_key, "")
        try:
            check_password(password)
        except ValueError:
            return None
        return Login(user, password) if user in slots else None

    retiring = annotations.get(RETIRING_ANNOTATION)
    return Credentials(
        active=login("username", "password"),
        next=login(NEXT_USERNAME, NEXT_PASSWORD),
        retiring=retiring if retiring in slots else None,
        token=annotations.get(ROTATION_ANNOTATION, ""),
        has_urls="WRITE_DB_URL" in data,
    )


def recorded_login(role: str, current_status: Mapping[str, Any]) -> str | None:
    """The pods' login as the status last recorded it; the role for a stack provisioned
    before this was recorded; None for a stack never provisioned."""
    login = (current_status.get("credentials") or {}).get("login")
    if login in logins(role):
        return str(login)
    return role if (current_status.get("databases") or {}).get("role") else None


def handled_token(creds: Credentials, current_status: Mapping[str, Any]) -> str:
    rotation = (current_status.get("credentials") or {}).get("rotation") or {}
    return creds.token or str(rotation.get("token") or "")


def secret_manifest(
    spec: StackSpec, creds: Credentials, pods_redis_url: str | None
) -> dict[str, Any]:
    """The credentials Secret for ``creds``: URLs only with ``pods_redis_url`` (the stack's
    objects are its own), the rotation's state in ``next-*`` keys and annotations."""
    data: dict[str, str] = {}
    if creds.active is not None:
        if pods_redis_url is not None:
            data = manifests.credentials_data(
                spec, creds.active.password, pods_redis_url, login=creds.active.username
            )
        else:
            data = {"username": creds.active.username, "password": creds.active.password}
    if creds.next is not None:
        data[NEXT_USERNAME], data[NEXT_PASSWORD] = creds.next.username, creds.next.password
    manifest = manifests.credentials_secret(spec, "", "", login="")
    manifest["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    annotations = {ROTATION_ANNOTATION: creds.token} if creds.token else {}
    if creds.retiring is not None:
        annotations[RETIRING_ANNOTATION] = creds.retiring
    if annotations:
        manifest["metadata"]["annotations"] = annotations
    return manifest


def status_of(creds: Credentials, message: str) -> dict[str, Any]:
    """``status.credentials``: the pods' login and the rotation's phase."""
    out: dict[str, Any] = {"rotation": {"token": creds.token, "phase": creds.phase}}
    out["rotation"]["message"] = message
    if creds.active is not None:
        out["login"] = creds.active.username
    return out
