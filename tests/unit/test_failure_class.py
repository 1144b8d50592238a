"""`failure_class`: what happened to a failed venue call, apart from what to do next (the error's type).
A 500 answered at once and a call with no answer in its budget are both resolved by client order id, yet
only the second is a timeout (issue 13, defect 5)."""

from __future__ import annotations

import pytest

from engine.exchange.errors import (
    Banned,
    FailureClass,
    InsufficientMargin,
    OutcomeUnknown,
    RateLimited,
    RejectCode,
    Rejected,
    Retryable,
    WouldTriggerImmediately,
    failure_class,
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TimeoutError(), FailureClass.TIMEOUT),  # our own call budget ran out
        (OutcomeUnknown("c", "no answer").answered(failure=FailureClass.TIMEOUT), FailureClass.TIMEOUT),
        (
            OutcomeUnknown("c", "HTTP 500").answered(http_status=500, venue_code=-1000),
            FailureClass.SERVER_ERROR,
        ),
        (OutcomeUnknown("c", "connection lost"), FailureClass.UNKNOWN_OUTCOME),
        (Retryable("HTTP 503 -1008").answered(http_status=503, venue_code=-1008), FailureClass.SERVER_ERROR),
        (Retryable("HTTP 400 -1021").answered(http_status=400, venue_code=-1021), FailureClass.REJECTED),
        (Retryable("could not connect"), FailureClass.NOT_SENT),
        (RateLimited(1.0), FailureClass.RATE_LIMITED),
        (Banned(0.0), FailureClass.RATE_LIMITED),
        (Rejected(RejectCode.MAX_CONDITIONAL_ORDERS, "cap"), FailureClass.REJECTED),
        (WouldTriggerImmediately(), FailureClass.REJECTED),
        (InsufficientMargin(), FailureClass.REJECTED),
    ],
)
def test_each_failure_is_classed_by_what_happened(error: BaseException, expected: FailureClass) -> None:
    assert failure_class(error) is expected


def test_a_refusal_carries_its_code_and_the_edge_adds_what_the_venue_answered() -> None:
    refused = Rejected(RejectCode.MAX_CONDITIONAL_ORDERS, "cap")
    assert refused.venue_code == -4045
    unknown = OutcomeUnknown("c").answered(http_status=500, venue_code=-1000)
    assert (unknown.http_status, unknown.venue_code, unknown.client_order_id) == (500, -1000, "c")
    # Named by the edge, the class wins over what the status alone would say (-1007 comes as a 503).
    lost = OutcomeUnknown("c").answered(
        http_status=503, venue_code=-1007, failure=FailureClass.UNKNOWN_OUTCOME
    )
    assert failure_class(lost) is FailureClass.UNKNOWN_OUTCOME


def test_a_ban_says_when_it_ends_as_an_operator_reads_it() -> None:
    """ "entry refused: the venue banned this IP …; until epoch 1796488345.969": the venue's epoch seconds
    printed raw (an operator's find). A date and time in UTC now."""
    assert str(Banned(1796488345.969, "banned")) == "banned; until 2026-12-05 16:32:25 UTC"
