"""Every reply code is documented (DESIGN contract 10): one registry in the
code (``engine.codes.REPLY_CODES``), README.md's reply table equal to it, and
no code literal in the engine's source that the registry lacks.

The source check reads the syntax tree, not text, so formatting cannot fool
it. It collects every string that sits where a reply code goes:

* the ``code`` argument of ``Reply``, ``Outcome``, ``FrameError`` and
  ``ProtocolError`` (with the status beside it, where one is given);
* the element right after a status in a tuple or list literal
  (``("dead_lettered", "lost_conflict", reason, True)``);
* what is assigned to a name or attribute called ``code`` (also inside a
  tuple target: ``code, reason = "invalid", …``);
* the first element of a ``(code, reason)`` pair: a two-element tuple whose
  second element is a sentence (an f-string, a method call on one, a
  ``clip_reason`` call, or a literal with a space).

Names and attributes (``codes.INVALID``, ``SEQ_REUSED``) are resolved through
the string constants the scanned modules define.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from engine import codes
from engine.codes import REPLY_CODES, STATUSES

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for pkg in ("engine", "persistence", "ipc") for p in sorted((ROOT / pkg).rglob("*.py"))]
README = ROOT / "README.md"

CODE_WORD = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# call name -> (index of the status argument or None, index of the code argument)
REPLY_CALLS = {"Reply": (2, 3), "Outcome": (1, 2), "FrameError": (None, 0), "ProtocolError": (None, 0)}


# ---------------------------------------------------------------- README
def readme_reply_table() -> set[tuple[str, str]]:
    """(status, code) pairs of the README's reply table: the table whose
    header is ``| status | code | meaning | connection |``."""
    lines = README.read_text().splitlines()
    header = [i for i, ln in enumerate(lines) if re.fullmatch(r"\|\s*status\s*\|\s*code\s*\|.*\|", ln.strip())]
    assert len(header) == 1, f"expected one reply table in README.md, found {len(header)}"
    pairs: set[tuple[str, str]] = set()
    for ln in lines[header[0] + 2 :]:  # skip the header and the | --- | row
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        (status,) = re.findall(r"`([^`]+)`", cells[0])
        found = re.findall(r"`([^`]+)`", cells[1])
        assert found, f"README reply row without a code: {ln}"
        pairs.update((status, code) for code in found)
    return pairs


def test_readme_reply_table_is_exactly_the_registry():
    documented = readme_reply_table()
    registered = {(status, code) for code, status in REPLY_CODES.items()}
    assert documented == registered, (
        f"in README.md only: {sorted(documented - registered)}; in engine.codes only: {sorted(registered - documented)}"
    )


def test_registry_is_consistent():
    assert set(REPLY_CODES.values()) <= set(STATUSES) - {codes.COMMITTED}
    assert all(CODE_WORD.match(code) for code in REPLY_CODES)
    # every module-level code constant is registered, and nothing else is
    constants = {
        v for k, v in vars(codes).items() if k.isupper() and isinstance(v, str) and k not in ("COMMITTED",)
    } - set(STATUSES)
    assert constants == set(REPLY_CODES)


# ---------------------------------------------------------------- source
def string_constants() -> dict[str, set[str]]:
    """Every upper-case ``NAME = "text"`` at module or class level in the
    scanned sources (the named constants a code may be spelled with)."""
    table: dict[str, set[str]] = {}
    for path in SOURCES:
        bodies = [ast.parse(path.read_text(), str(path)).body]
        while bodies:
            for node in bodies.pop():
                if isinstance(node, ast.ClassDef):
                    bodies.append(node.body)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id.isupper() and isinstance(node.value.value, str):
                            table.setdefault(t.id, set()).add(node.value.value)
    return table


class Scanner:
    def __init__(self) -> None:
        self.constants = string_constants()
        self.found: list[tuple[str, str | None, str]] = []  # (code, status or None, where)

    def strings(self, node: ast.AST | None) -> set[str]:
        """The strings an expression can be: literals, named constants, either branch of ``a if c else b``."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Name):
            return self.constants.get(node.id, set())
        if isinstance(node, ast.Attribute):
            return self.constants.get(node.attr, set())
        if isinstance(node, ast.IfExp):
            return self.strings(node.body) | self.strings(node.orelse)
        return set()

    def strings_at(self, node: ast.AST, index: int) -> set[str]:
        """The strings element ``index`` of a tuple expression can be."""
        if isinstance(node, (ast.Tuple, ast.List)) and index < len(node.elts):
            return self.strings(node.elts[index])
        if isinstance(node, ast.IfExp):
            return self.strings_at(node.body, index) | self.strings_at(node.orelse, index)
        return set()

    def note(self, values: set[str], status: str | None, where: str) -> None:
        for value in values:
            if value:  # "" is "no code" (Outcome's default)
                self.found.append((value, status, where))

    @staticmethod
    def is_sentence(node: ast.AST) -> bool:
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return " " in node.value.strip()
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and Scanner.is_sentence(func.value):
                return True  # f"…".strip()
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            return name == "clip_reason"
        return False

    def scan(self, path: Path, root: Path = ROOT) -> None:
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(root)
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in REPLY_CALLS:
                    status_at, code_at = REPLY_CALLS[name]
                    keywords = {k.arg: k.value for k in node.keywords}
                    code_node = node.args[code_at] if len(node.args) > code_at else keywords.get("code")
                    status_node = (
                        node.args[status_at]
                        if status_at is not None and len(node.args) > status_at
                        else keywords.get("status")
                    )
                    statuses = self.strings(status_node) & set(STATUSES)
                    status = next(iter(statuses)) if len(statuses) == 1 else None
                    self.note(self.strings(code_node), status, where)
            elif isinstance(node, (ast.Tuple, ast.List)):
                elts = node.elts
                for i, elt in enumerate(elts[:-1]):
                    statuses = self.strings(elt) & set(STATUSES)
                    if len(statuses) == 1 and isinstance(elt, (ast.Constant, ast.Name, ast.Attribute)):
                        self.note(self.strings(elts[i + 1]), next(iter(statuses)), where)
                if len(elts) == 2 and self.is_sentence(elts[1]):
                    self.note({s for s in self.strings(elts[0]) if CODE_WORD.match(s)}, None, where)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if (isinstance(t, ast.Name) and t.id == "code") or (
                        isinstance(t, ast.Attribute) and t.attr == "code"
                    ):
                        self.note(self.strings(node.value), None, where)
                    elif isinstance(t, ast.Tuple):
                        for i, elt in enumerate(t.elts):
                            if isinstance(elt, ast.Name) and elt.id == "code":
                                self.note(self.strings_at(node.value, i), None, where)


def scanned_codes() -> list[tuple[str, str | None, str]]:
    scanner = Scanner()
    for path in SOURCES:
        scanner.scan(path)
    return scanner.found


def _statuses_and_codes(found) -> Iterator[tuple[str, str | None, str]]:
    # A status word found in a code position (``Reply(..., status, code)``
    # with the status spelled out) is not a code.
    for code, status, where in found:
        if code not in STATUSES:
            yield code, status, where


def test_every_code_the_source_sends_is_registered_with_its_status():
    found = list(_statuses_and_codes(scanned_codes()))
    unregistered = sorted({(code, where) for code, _, where in found if code not in REPLY_CODES})
    assert not unregistered, f"reply codes in the source but not in engine.codes.REPLY_CODES: {unregistered}"
    wrong = sorted(
        (code, status, REPLY_CODES[code], where)
        for code, status, where in found
        if status and REPLY_CODES[code] != status
    )
    assert not wrong, f"(code, status in the source, status registered, where): {wrong}"


def test_every_registered_code_is_sent_somewhere():
    """The other direction: the scan finds every registered code, so the
    registry holds no stale code and the scan still reaches every place."""
    sent = {code for code, _, _ in _statuses_and_codes(scanned_codes())}
    assert set(REPLY_CODES) <= sent, f"registered but never sent: {sorted(set(REPLY_CODES) - sent)}"


def test_the_scan_sees_every_form_a_code_is_written_in(tmp_path):
    """The scanner itself, on a made-up module: each form is found, with its
    status where the form gives one."""
    src = tmp_path / "made_up.py"
    src.write_text(
        "NEW_CODE = 'c_named'\n"
        "class E:\n"
        "    code = 'c_class'\n"
        "def f(x, r):\n"
        "    a = Reply(None, None, 'rejected', 'c_reply', 'a reason')\n"
        "    b = Outcome(1, status='busy', code='c_outcome_kw')\n"
        "    c = FrameError('c_frame', 'a reason')\n"
        "    d = ('dead_lettered', 'c_tuple', r, False)\n"
        "    e = ('rejected', NEW_CODE, r, False)\n"
        "    code = 'c_assign' if x else 'c_assign_else'\n"
        "    code, reason = ('c_pair', f'{x} went wrong') if x else ('c_pair_else', 'it went wrong')\n"
        "    x.code = 'c_attr'\n"
        "    return 'c_return', f'{x} was refused'.strip()\n"
    )
    scanner = Scanner()
    scanner.constants.setdefault("NEW_CODE", set()).add("c_named")
    scanner.scan(src, root=tmp_path)
    found = {(code, status) for code, status, _ in scanner.found}
    assert found >= {
        ("c_class", None),
        ("c_reply", "rejected"),
        ("c_outcome_kw", "busy"),
        ("c_frame", None),
        ("c_tuple", "dead_lettered"),
        ("c_named", "rejected"),
        ("c_assign", None),
        ("c_assign_else", None),
        ("c_pair", None),
        ("c_pair_else", None),
        ("c_attr", None),
        ("c_return", None),
    }, found
