"""The Lua scripts, loaded from ``lua/*.lua`` and registered once per Redis client.

Each script is ``common.lua`` followed by its own file, so helpers live in one place.
``register_script`` gives EVALSHA with an automatic reload when Redis answers NOSCRIPT.
"""

from __future__ import annotations

import functools
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


@functools.cache
def source(name: str) -> str:
    """Return the full text of script ``name`` (the common helpers first, for a group's)."""
    folder = resources.files(__package__).joinpath("lua")
    own = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in STANDALONE:
        return own
    return folder.joinpath("common.lua").read_text(encoding="utf-8") + "\n" + own


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
