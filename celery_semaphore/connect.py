"""The client of the gates' Redis: one server, a Sentinel-watched master, or a Redis Cluster.

``semaphore_redis_url`` spells which:

- ``redis://``, ``rediss://``, ``unix://``: one server (redis-py's URL format);
- ``sentinel://h1:26379;h2:26379/mymaster``: the master Sentinel names ``mymaster``
  (kombu's spelling of several hosts); query options ``db``, ``password``,
  ``sentinel_password``; a failover is followed without a restart;
- ``redis+cluster://h1:7000,h2:7001`` (or ``rediss+cluster://``), or a ``redis://`` URL of one
  node with ``semaphore_redis_cluster = True``: a Redis Cluster. Every script touches one hash
  tag, so it runs on the node that owns its group.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

from .errors import ConfigurationError

__all__ = ["SCHEMES", "check_url", "connect", "kind_of"]

#: URL schemes semaphore_redis_url accepts.
SCHEMES = ("redis", "rediss", "unix", "sentinel", "redis+cluster", "rediss+cluster")


def kind_of(url: str, cluster: bool = False) -> str:
    """``"single"``, ``"sentinel"`` or ``"cluster"`` for a URL (see the module docstring)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sentinel":
        return "sentinel"
    if scheme.endswith("+cluster") or cluster:
        return "cluster"
    return "single"


def check_url(url: object) -> str:
    """Return ``url`` when it is a URL this module can connect to, or raise saying why."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"semaphore_redis_url must be a redis:// URL, got {url!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"semaphore_redis_url: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}"
        )
    if scheme == "sentinel" and not urlsplit(url.replace(";", ",")).path.strip("/"):
        raise ConfigurationError(
            "semaphore_redis_url: a sentinel:// URL names its master after the hosts, "
            "e.g. sentinel://h1:26379;h2:26379/mymaster"
        )
    return url


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.replace(";", ",").split(","):
        part = part.rsplit("@", 1)[-1].removeprefix("sentinel://")
        if not part:
            continue
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        hosts.append((host or part, int(port) if port else default_port))
    return hosts


def connect(url: str, *, cluster: bool = False, timeout_s: float = 5.0) -> Any:
    """A redis-py client for ``url``: ``redis.Redis`` (one server or a Sentinel's master) or
    ``RedisCluster``, with ``timeout_s`` as connect and read timeout."""
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    kind = kind_of(url, cluster)
    if kind == "sentinel":
        # "sentinel://h1:26379;h2:26379/mymaster?db=0": ";" would end the netloc for urlsplit.
        parts = urlsplit(url.replace(";", ","))
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        password = unquote(parts.password) if parts.password else query.get("password")
        sentinel = Sentinel(
            _hosts(parts.netloc, 26379),
            sentinel_kwargs={**timeouts, "password": query.get("sentinel_password")},
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return sentinel.master_for(
            parts.path.strip("/"), db=int(query.get("db", 0)), password=password
        )
    if kind == "cluster":
        scheme, rest = url.split("://", 1)
        base = "rediss" if scheme.lower().startswith("rediss") else "redis"
        netloc, _, tail = rest.partition("/")
        auth, _, hostlist = netloc.rpartition("@")
        nodes = [ClusterNode(h, p) for h, p in _hosts(hostlist, 6379)]
        first = f"{base}://{auth + '@' if auth else ''}{nodes[0].host}:{nodes[0].port}/{tail}"
        try:
            return RedisCluster.from_url(
                first, startup_nodes=nodes, require_full_coverage=False, **timeouts
            )
        except RedisClusterException as exc:
            # No seed node answered. redis-py raises this outside its RedisError tree; as a
            # ConnectionError the callers report it as RedisUnavailable (a prerun then knows
            # the start went unrecorded), as for a refused connection to one server.
            raise redis.ConnectionError(str(exc)) from exc
    return redis.Redis.from_url(url, **timeouts)


def sanitize(url: str) -> str:
    """``url`` without its passwords (for errors and logs): the one before ``@`` and the
    ``password`` and ``sentinel_password`` query options."""
    parts = urlsplit(url.replace(";", ","))
    if parts.password:
        url = url.replace(f":{parts.password}@", ":**@", 1)
    return re.sub(r"([?&](?:sentinel_)?password=)[^&#]*", r"\1**", url)
