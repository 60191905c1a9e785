"""What the admin socket's commands do (the protocol is in shared/admin.py, the server in admin.py).

Every command only records intent or reads state; the master loop acts (a reload sets a new
generation, a scale sets the target, and reconcile() converges). `invalidate` publishes through the
cluster bus and replies once every worker acknowledged.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from mcpherd.shared import admin, events
from mcpherd.supervisor import autoscale, status
from mcpherd.supervisor.admin import Client
from mcpherd.supervisor.config import effective

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master


class Commands:
    def __init__(self, master: Master) -> None:
        self.master = master

    def handlers(self) -> dict[str, Any]:
        return {"status": self.status, "reload": self.reload, "scale": self.scale,
                "invalidate": self.invalidate, "stop": self.stop, "config": self.config}

    def status(self, client: Client, request: admin.Request) -> None:
        client.reply(status.build(self.master))

    def reload(self, client: Client, request: admin.Request) -> None:
        previous = self.master.generation
        self.master.reload()
        if self.master.generation == previous:
            client.reply(error=("refused", self.master.reload_failed or "reload refused"))
            return
        client.reply({"generation": self.master.generation, "previous_generation": previous})

    def scale(self, client: Client, request: admin.Request) -> None:
        args = msgspec.convert(request.args, admin.ScaleArgs)
        if (args.workers is None) == (args.delta is None):
            raise ValueError("scale needs exactly one of workers or delta")
        wanted = args.workers if args.workers is not None else self.master.target + (args.delta or 0)
        if not 1 <= wanted <= self.master.max_slots:
            client.reply(error=("refused", f"the worker count must be between 1 and {self.master.max_slots}"))
            return
        master = self.master
        master.set_target(wanted, "admin scale")
        if master.config.autoscale.enabled:
            master.scale_state = autoscale.operator_floor(master.scale_state, wanted, time.monotonic(),
                                                          master.config.autoscale)
        client.reply({"workers_target": master.target})

    def invalidate(self, client: Client, request: admin.Request) -> None:
        args = msgspec.convert(request.args, admin.InvalidateArgs)
        if not (args.key or args.tag or args.prefix or args.all):
            raise ValueError("invalidate needs key, tag, prefix or all")
        client.waiting += 1

        def done(seq: int, complete: bool) -> None:
            client.waiting -= 1
            client.reply({"seq": seq, "acknowledged": complete})

        self.master.bus.publish_from_master(events.Invalidate(args.key, args.tag, args.prefix, args.all), done)

    def stop(self, client: Client, request: admin.Request) -> None:
        graceful = request.args.get("graceful", True) is not False
        client.reply({"stopping": True, "graceful": graceful})
        client.flush()
        self.master.stop(graceful=graceful)

    def config(self, client: Client, request: admin.Request) -> None:
        client.reply(effective(self.master.config))
