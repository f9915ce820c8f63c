"""A refused apply's error: the API server's causes, never a Secret's refused value."""

from __future__ import annotations

import json

from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_operator import kube
from cqrs_operator.reconcile import apply_error


def refusal(causes: list[dict[str, str]], status: int = 422) -> ApiException:
    exc = ApiException(status=status, reason="Unprocessable Entity")
    body = {"kind": "Status", "message": "the whole story", "details": {"causes": causes}}
    exc.body = json.dumps(body)
    return exc


def test_a_refused_deployment_names_the_field_and_cause_and_is_permanent() -> None:
    field = "spec.template.spec.tolerations[0].operator"
    exc = refusal([{"field": field, "message": "Invalid value: must be Exists"}])
    error = apply_error("Deployment", "orders-write-api", exc)
    assert error.reason == "ApplyInvalid" and error.permanent
    assert f"{field}: Invalid value: must be Exists" in error.message
    # Any other refusal (conflict, server trouble) stays transient.
    other = apply_error("Deployment", "orders-write-api", refusal([], status=409))
    assert other.reason == "ApplyFailed" and not other.permanent
    assert "the whole story" in other.message  # no causes: the Status message


def test_a_refused_secret_names_fields_only() -> None:
    exc = refusal([{"field": "data[TOKEN]", "message": "Invalid value: 's3cret-value'"}])
    error = apply_error("Secret", "orders-credentials", exc)
    assert "data[TOKEN]" in error.message
    assert "s3cret" not in error.message and "the whole story" not in error.message
    assert error.reason == "ApplyFailed"


def test_causes_are_bounded_and_an_unreadable_body_is_left_out() -> None:
    many = [{"field": f"f{i}", "message": "x" * 1000} for i in range(kube.MAX_CAUSES + 3)]
    text = kube.refusal_causes(refusal(many))
    assert text.count("; ") == kube.MAX_CAUSES  # MAX_CAUSES causes and "and 3 more"
    assert text.endswith("and 3 more")
    assert len(text) < (kube.MAX_CAUSE_CHARS + 10) * (kube.MAX_CAUSES + 1)
    bad = ApiException(status=422, reason="Unprocessable Entity")
    bad.body = "<html>"
    assert kube.refusal_causes(bad) == ""
