"""DNS-rebinding protection: the Host and Origin of every request are checked against allow-lists.

A browser tricked into talking to a local MCP server sends the attacker's host name and origin; a
server bound to loopback only ever needs loopback names. Entries are `host`, `host:port` or `host:*`;
a single `*` disables the check (for deployments behind a proxy that already checks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]")


def loopback_origins() -> tuple[str, ...]:
    return tuple(f"{scheme}://{host}" for scheme in ("http", "https") for host in LOOPBACK_HOSTS)


class AllowList:
    def __init__(self, entries: Iterable[str]) -> None:
        self.any = False
        self.exact: set[str] = set()
        self.any_port: set[str] = set()
        # Every request of a client sends the same Host (and Origin): each value is checked once. The
        # bound keeps a client that varies it from growing the cache.
        self.allows: Callable[[str], bool] = functools.lru_cache(maxsize=256)(self._allows)
        for entry in entries:
            entry = entry.strip().lower()
            if entry == "*":
                self.any = True
            elif entry.endswith(":*"):
                self.any_port.add(entry[:-2])
            else:
                self.exact.add(entry)

    def _allows(self, value: str) -> bool:
        value = value.lower()
        if self.any or value in self.exact:
            return True
        base, sep, port = value.rpartition(":")
        return bool(sep) and port.isdigit() and base in self.any_port


def default_hosts(bind_hosts: Iterable[str]) -> list[str]:
    """Loopback names always; a non-loopback bind address also admits itself (with any port)."""
    hosts = list(LOOPBACK_HOSTS)
    for host in bind_hosts:
        if host in ("0.0.0.0", "::", ""):
            continue  # a wildcard bind must be given explicit names (--allowed-host)
        name = f"[{host}]" if ":" in host else host
        hosts += [name, f"{name}:*"]
    return hosts
