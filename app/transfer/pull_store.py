"""What is kept of pulls, on both sides: ``PullStore``.

The requester keeps each pull its users made (``Pull``): what was asked of which partner
trust, and what the holder answered, each matched study with the id of the transfer the
holder queued for it. That id becomes the id of the requester's inbound transfer record
when the study arrives, which is how a pull's view follows its studies.

The holder keeps its answer to each request (``PullAnswer``), by requester gateway and
request id, so that a request sent again gets the same answer and queues nothing more.
An answer is *claimed* before the holder queues anything (a row without studies), then
completed; a claim left incomplete for a while (the process stopped meanwhile) may be
taken over by the next request with that id.

SQLite implements it (``app.transfer.sqlite_pulls``). The store knows no clock: callers
pass the times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

PullState = Literal["answered", "failed"]


@dataclass(frozen=True)
class PulledStudy:
    """A study the holder matched, and the id of the transfer it queued to send it."""

    study: str
    transfer: str


@dataclass(frozen=True)
class Pull:
    """A pull made at this gateway by a user of ``trust``."""

    id: str
    trust: str
    partner: str
    partner_trust: str
    query: Mapping[str, str]
    limit: int
    priority: str
    created_at: float
    actor: str
    state: PullState
    studies: tuple[PulledStudy, ...] = ()
    #: Why the partner did not answer (``failed``).
    error: str | None = None


@dataclass(frozen=True)
class PullAnswer:
    """The holder's answer to one request; ``studies`` is ``None`` while being answered."""

    requester: str
    request_id: str
    digest: str
    claimed_at: float
    studies: tuple[PulledStudy, ...] | None


@dataclass(frozen=True)
class AnswerClaim:
    """The answer on record for a request id; ``claimed``: the caller holds it, to answer."""

    answer: PullAnswer
    claimed: bool


class PullStore(Protocol):
    async def open(self) -> None: ...

    async def insert(self, pull: Pull) -> None:
        """Record a new pull (its id is new: ids are random)."""

    async def get(self, pull_id: str) -> Pull | None: ...

    async def find(self, trust: str, limit: int) -> list[Pull]:
        """The trust's pulls, newest first."""

    async def claim_answer(
        self, requester: str, request_id: str, digest: str, now: float, stale_before: float
    ) -> AnswerClaim:
        """Claim the answer to ``request_id`` of ``requester``: claimed when none is on
        record, or when an incomplete one was claimed before ``stale_before``; otherwise
        the answer on record, unclaimed. Answers claimed more than a day before ``now`` are
        forgotten on the way."""

    async def complete_answer(
        self, answer: PullAnswer, studies: tuple[PulledStudy, ...]
    ) -> PullAnswer | None:
        """Record the studies of a claimed answer; ``None`` when the claim was taken over
        meanwhile (the answer on record is then the other claimant's)."""

    async def release_answer(self, answer: PullAnswer) -> None:
        """Forget a claimed answer never completed (the answer failed): the next copy of
        the request claims it afresh."""

    async def close(self) -> None: ...
