"""The Lua scripts, loaded from ``lua/*.lua`` and registered once per Redis client.

Each script is ``common.lua`` followed by its own file, so helpers live in one place; only
the helpers a script reaches are kept (and no comment lines): Redis runs a script's whole
chunk on every call, and defining all of common.lua's functions was a third of the time of
the shortest scripts (see benchmarks/README.md, Profile). ``register_script`` gives EVALSHA
with an automatic reload when Redis answers NOSCRIPT.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from .errors import ScriptError

__all__ = ["NAMES", "STANDALONE", "Scripts", "source"]

#: The scripts of a gate group: each is common.lua followed by its own file.
NAMES = (
    "acquire", "start", "release", "keepalive", "reclaim", "claim", "cancel", "resize", "link",
    "satisfy", "operate", "ack",
)  # fmt: skip
#: Scripts of the recurring schedules, which stand alone (their keys are not a group's).
STANDALONE = ("recur_add", "recur_take", "recur_note")


# A top-level statement of common.lua starts at column 0; a helper's is one of these.
_HELPER = re.compile(r"^(?:local function (\w+)|(\w+) = function|local (\w+)$)")
_WORD = re.compile(r"[A-Za-z_]\w*")


def _statements(text: str) -> list[tuple[str | None, str]]:
    """common.lua's top-level statements in order: (helper name or None, text)."""
    found: list[tuple[str | None, list[str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("--"):
            continue
        if line[0] not in " \t" and not line.startswith(("end", "}")):
            match = _HELPER.match(line)
            name = (match.group(1) or match.group(2) or match.group(3)) if match else None
            found.append((name, []))
        if found:
            found[-1][1].append(line)
    return [(name, "\n".join(lines)) for name, lines in found]


def _shaken(common: str, own: str) -> str:
    """common.lua with only the helpers ``own`` (and common's own statements) reach."""
    statements = _statements(common)
    helpers: dict[str, list[str]] = {}
    for name, text in statements:
        if name is not None:
            helpers.setdefault(name, []).append(text)
    needed: set[str] = set()
    pending = [own] + [text for name, text in statements if name is None]
    while pending:
        for word in set(_WORD.findall(pending.pop())):
            if word in helpers and word not in needed:
                needed.add(word)
                pending.extend(helpers[word])
    return "\n".join(text for name, text in statements if name is None or name in needed)


@functools.cache
def source(name: str) -> str:
    """Return the text of script ``name`` (for a group's: the helpers it uses first)."""
    folder = resources.files(__package__).joinpath("lua")
    own = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in STANDALONE:
        return own
    common = folder.joinpath("common.lua").read_text(encoding="utf-8")
    return _shaken(common, own) + "\n" + own


class Scripts:
    """The registered scripts of one Redis client, as attributes named like the files."""

    acquire: Script
    start: Script
    release: Script
    keepalive: Script
    reclaim: Script
    claim: Script
    cancel: Script
    resize: Script
    link: Script
    satisfy: Script
    operate: Script
    ack: Script
    recur_add: Script
    recur_take: Script
    recur_note: Script

    def __init__(self, client: redis.Redis) -> None:
        for name in NAMES + STANDALONE:
            setattr(self, name, client.register_script(source(name)))


def code_of(script: str, reply: Any, known: tuple[int, ...]) -> int:
    """Return the status code of a script's reply (after the epoch), or raise ScriptError."""
    try:
        code = int(reply[1])
    except (TypeError, ValueError, IndexError):
        raise ScriptError(script, reply) from None
    if code not in known:
        raise ScriptError(script, reply)
    return code
