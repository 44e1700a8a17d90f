"""Every reply status and code the engine can send: the single source.

A reply's ``status`` says what happened to the intent; its ``code`` (absent
when committed) says why, in a word a program can switch on. Each code
belongs to exactly one status. ``REPLY_CODES`` maps every code to its
status; README.md's reply table lists exactly these (tests/test_reply_codes.py
holds the two equal, and checks that every code literal in the engine's
source is registered here).

This module imports nothing, so every layer may use it; ``ipc`` and
``persistence`` keep their few literals (they must not depend on ``engine``)
and the test above keeps them honest.
"""

from __future__ import annotations

# Statuses ---------------------------------------------------------------
COMMITTED = "committed"
DEAD_LETTERED = "dead_lettered"
REJECTED = "rejected"
BUSY = "busy"

STATUSES = (COMMITTED, DEAD_LETTERED, REJECTED, BUSY)

# rejected: nothing stored, the client's input was wrong -----------------
BAD_FRAMING = "bad_framing"
FRAME_TOO_LARGE = "frame_too_large"
MALFORMED = "malformed"
NOT_UTF8 = "not_utf8"
INVALID = "invalid"
UNKNOWN_KIND = "unknown_kind"
UNKNOWN_OP = "unknown_op"
UNAVAILABLE = "unavailable"
SEQ_REUSED = "seq_reused"

# dead_lettered: stored with its reason; a resend gets the same reply -----
HANDLER_ERROR = "handler_error"
NO_SUCH_ENTITY = "no_such_entity"
ENTITY_EXISTS = "entity_exists"
CONSTRAINT_VIOLATION = "constraint_violation"
WRITE_ERROR = "write_error"
PLANNER_ERROR = "planner_error"
UNSTORABLE = "unstorable"
LOST_CONFLICT = "lost_conflict"

# busy: nothing stored, resend later ---------------------------------------
DATABASE_UNAVAILABLE = "database_unavailable"
SHUTTING_DOWN = "shutting_down"

REPLY_CODES: dict[str, str] = {
    BAD_FRAMING: REJECTED,
    FRAME_TOO_LARGE: REJECTED,
    MALFORMED: REJECTED,
    NOT_UTF8: REJECTED,
    INVALID: REJECTED,
    UNKNOWN_KIND: REJECTED,
    UNKNOWN_OP: REJECTED,
    UNAVAILABLE: REJECTED,
    SEQ_REUSED: REJECTED,
    HANDLER_ERROR: DEAD_LETTERED,
    NO_SUCH_ENTITY: DEAD_LETTERED,
    ENTITY_EXISTS: DEAD_LETTERED,
    CONSTRAINT_VIOLATION: DEAD_LETTERED,
    WRITE_ERROR: DEAD_LETTERED,
    PLANNER_ERROR: DEAD_LETTERED,
    UNSTORABLE: DEAD_LETTERED,
    LOST_CONFLICT: DEAD_LETTERED,
    DATABASE_UNAVAILABLE: BUSY,
    SHUTTING_DOWN: BUSY,
}
"""code -> the status it is sent with."""
