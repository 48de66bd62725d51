"""What one request to a worker came to: a typed status and the error text, with what was measured.

Every answer that crosses the worker pipe (tuner/worker.py) is an :class:`Outcome`: the child builds one from what
tuner/measure.py returns or from the exception it caught, sends it as JSON, and the parent reads it back (or makes
one for a child that hung, crashed or answered nonsense). The study stores ``status`` as its string value, so the
journal and the tables stay readable.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    """A trial's or a request's outcome, stored as its ``status`` user attribute (a plain string in the storage)."""

    OK = "ok"
    INFEASIBLE = "infeasible"
    DUPLICATE = "duplicate"
    COMPILE_ERROR = "compile_error"
    OUT_OF_RESOURCES = "out_of_resources"
    WRONG_ANSWER = "wrong_answer"
    OUT_OF_MEMORY = "out_of_memory"
    ERROR = "error"
    TIMEOUT = "timeout"
    CRASH = "crash"
    FAULT = "fault"
    INTERRUPTED = "interrupted"

    @staticmethod
    def of(value: Any) -> Status:
        """The status a worker answered or a trial stored; anything unknown is an error, not an exception."""
        try:
            return Status(str(value))
        except ValueError:
            return Status.ERROR


# Outcomes after which a worker process must not be reused: a CUDA fault poisons its context.
FATAL = frozenset({Status.FAULT})


@dataclass(frozen=True)
class Outcome:
    """``status`` and ``reason`` (None when OK), and ``data``: what the request measured, by name (``p20_ms``,
    ``p50_ms``, ``p80_ms``, ``reps``, ``launch``, ``err_<output>``, ``timings``, ``stages``, ``telemetry``,
    ``elapsed_s``, ``wall_s``, ...), plain JSON values."""

    status: Status
    reason: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def with_data(self, **more: Any) -> Outcome:
        return Outcome(self.status, self.reason, {**self.data, **more})

    def describe(self) -> str:
        """``"compile_error: CompilationError: ..."``, for notes and logs."""
        return f"{self.status.value}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {**self.data, "status": self.status.value, "reason": self.reason}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Outcome:
        rest = {k: v for k, v in data.items() if k not in ("status", "reason")}
        reason = data.get("reason")
        return Outcome(Status.of(data.get("status")), None if reason is None else str(reason), rest)


def ok(**data: Any) -> Outcome:
    return Outcome(Status.OK, None, data)


def failed(status: Status, reason: str, **data: Any) -> Outcome:
    return Outcome(status, reason, data)
