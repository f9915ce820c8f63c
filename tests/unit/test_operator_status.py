"""The operator's pure decisions: ownership markers, availability, phases, SCRAM verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from cqrs_operator import status
from cqrs_operator.ownership import (
    ADOPTED,
    CREATED,
    Marker,
    OwnershipRefused,
    claim,
    may_drop,
    parse_marker,
)
from cqrs_operator.provisioning import scram_verifier

UID = "0b7e3c1a-2f4d-4c7b-9a51-3f0e2d1c4b5a"
OTHER = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"


def test_a_marker_round_trips_and_foreign_comments_are_no_marker() -> None:
    marker = Marker(UID, CREATED)
    assert parse_marker(marker.text()) == marker
    assert parse_marker(marker.text().encode()) == marker
    assert parse_marker("orders of the shop team") is None
    assert parse_marker(None) is None
    with pytest.raises(ValueError):
        Marker("x'; DROP", CREATED).text()


def test_claim_keeps_own_refuses_foreign_and_adopts_only_when_asked() -> None:
    assert claim("database d", Marker(UID, CREATED), UID, adopt=False) is None
    with pytest.raises(OwnershipRefused) as foreign:
        claim("database d", Marker(OTHER, CREATED), UID, adopt=True)  # adopt never steals
    assert foreign.value.reason == "OwnedByAnotherStack" and "database d" in foreign.value.message
    with pytest.raises(OwnershipRefused) as unmarked:
        claim("database d", None, UID, adopt=False)
    assert unmarked.value.reason == "NotOwned" and unmarked.value.permanent
    assert claim("database d", None, UID, adopt=True) == Marker(UID, ADOPTED)


def test_only_what_the_stack_created_may_be_dropped() -> None:
    assert may_drop(Marker(UID, CREATED), UID)
    assert not may_drop(Marker(UID, ADOPTED), UID)
    assert not may_drop(Marker(OTHER, CREATED), UID)
    assert not may_drop(None, UID)


def test_scram_verifier_matches_rfc_7677() -> None:
    """Recompute the stored and server keys as a server does from the salt."""
    salt = b"0123456789abcdef"
    verifier = scram_verifier("pencil-pencil-pencil", salt=salt)
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt_b64 = iterations_salt.split(":")
    stored, server = keys.split(":")
    assert method == "SCRAM-SHA-256" and iterations == "4096"
    assert base64.b64decode(salt_b64) == salt
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil-pencil-pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert base64.b64decode(stored) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server) == hmac.new(salted, b"Server Key", "sha256").digest()
    assert "pencil" not in verifier
    assert scram_verifier("pencil-pencil-pencil") != verifier  # a fresh salt each time


def deployment(wanted: int, available: int, generation: int = 2, observed: int = 2) -> dict:
    return {
        "metadata": {"name": "s-read-api", "generation": generation},
        "spec": {"replicas": wanted},
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": available,
            "availableReplicas": available,
        },
    }


def test_a_deployment_is_available_only_with_every_replica_of_its_generation() -> None:
    assert status.deployment_unavailable(deployment(2, 2)) is None
    assert status.deployment_unavailable(deployment(0, 0)) is None
    assert "1/2 available" in (status.deployment_unavailable(deployment(2, 1)) or "")
    assert "not yet observed" in (status.deployment_unavailable(deployment(2, 2, 3, 2)) or "")
    assert status.deployment_unavailable({"metadata": {"name": "x"}, "spec": {"replicas": 1}})


def pod(name: str, reason: str) -> dict:
    waiting = {"reason": reason, "message": f"{reason} detail"}
    return {
        "metadata": {"name": name},
        "status": {"containerStatuses": [{"state": {"waiting": waiting}}]},
    }


def test_pod_problem_names_the_most_telling_reason() -> None:
    assert status.pod_problem([]) is None
    assert status.pod_problem([pod("a", "ContainerCreating")]) is None
    reason, text = status.pod_problem(
        [pod("a", "CrashLoopBackOff"), pod("b", "ImagePullBackOff")]
    ) or ("", "")
    assert reason == "ImagePullBackOff" and "pod b" in text


def conds(**parts: tuple[str, str]) -> list[dict]:
    return [{"type": t, "status": s, "reason": r} for t, (s, r) in parts.items()]


def test_phase_failed_needs_a_change_degraded_is_transient() -> None:
    ok = ("True", "x")
    assert status.phase(conds(Ready=ok)) == "Ready"
    refused = conds(DatabasesReady=("False", "OwnedByAnotherStack"), StreamReady=ok)
    assert status.phase(refused) == "Failed"
    assert status.phase(conds(DatabasesReady=("False", "DatabaseUnreachable"))) == "Degraded"
    rolling = conds(DatabasesReady=ok, WorkloadsAvailable=("False", "RolloutInProgress"))
    assert status.phase(rolling) == "Provisioning"
    assert status.phase(rolling, was_ready=True) == "Degraded"
    assert status.phase(conds(WorkloadsAvailable=("False", "ImagePullBackOff"))) == "Failed"


def test_ready_needs_available_workloads() -> None:
    parts = {t: ("True", "x") for t in status.READY_PARTS}
    assert status.ready_condition(conds(**parts)).status is True
    parts[status.AVAILABLE] = ("False", "CrashLoopBackOff")
    ready = status.ready_condition(conds(**parts))
    assert ready.status is False and ready.reason == "CrashLoopBackOff"
