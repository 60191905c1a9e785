"""The master: one loop that sleeps in one place and then acts on what happened.

    while running:
        sleep until a signal, a worker message or the next tick
        dispatch queued signals by name (handle_hup, handle_term, ...)
        reap exited children
        check workers: readiness, stalled loops, recycling limits, kill deadlines
        reconcile: converge the slots to the desired state (target count, generation)

Signal handlers do nothing but wake the loop: `signal.set_wakeup_fd` writes each signal's number to
a pipe the loop selects on, and the loop reads them as its queue. No threads; everything that acts
happens in the loop, in the order above (gunicorn's arbiter and nginx's master cycle, flattened).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable

from setproctitle import setproctitle

from mcpherd.shared import control, layout
from mcpherd.shared import metrics
from mcpherd.supervisor import autoscale, policy, status
from mcpherd.supervisor.admin import AdminServer, AlreadyRunning
from mcpherd.supervisor.bus import Bus
from mcpherd.supervisor.commands import Commands
from mcpherd.supervisor.config import Config, ConfigError, load, parse_bind
from mcpherd.supervisor.dashboard import Observer
from mcpherd.supervisor.metrics import ClusterMetrics, LiveLane, MetricsServer
from mcpherd.supervisor.slots import Proc, Slot, State
from mcpherd.supervisor import bridge
from mcpherd.supervisor.notify import Notifier, activated_sockets
from mcpherd.supervisor.redis_link import RedisLink
from mcpherd.shared.netstat import accept_queue_length, listen_drops
from mcpherd.supervisor.sockets import INHERIT_ENV, ListenerGroup, adopt_activated, inherited_groups
from mcpherd.supervisor.spawn import MASTER_SIGNALS, WorkerLaunch, fork_worker
from mcpherd.supervisor.topology import allowed_cpus, cpu_for_slot, placement, read_topology
from mcpherd.supervisor.upgrade import Upgrade
from mcpherd.worker.server import EXIT_APP_LOAD_ERROR, WorkerConfig

log = logging.getLogger("mcpherd.master")
TICK_S = 0.1
ABORT_GRACE_S = 2.0  # after SIGABRT, time to print the traceback before SIGKILL
EXIT_GAVE_UP = 3  # every slot tripped its restart intensity: let systemd decide


class Master:
    def __init__(self, config: Config, config_path: str | None, overrides: dict[str, object]) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.pid = os.getpid()
        self.started_at = time.time()
        self.generation = int(os.environ.pop("MCPHERD_GENERATION", "1"))
        self.cpu_order = placement(read_topology(), allowed_cpus())
        self.max_slots = max(len(self.cpu_order), self._configured_workers(), config.autoscale.max_workers)
        self.target = self._configured_workers()
        self.slots = [Slot(i, cpu_for_slot(self.cpu_order, i)) for i in range(self.max_slots)]
        self.groups: list[ListenerGroup] = []
        self.segment = layout.Segment.create(self.max_slots)
        self.secret = b""
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.running = True
        self.exit_code = 0
        self.stopping_since = 0.0
        self.reload_failed = ""
        self.reloads = 0
        self.rng = random.Random()
        self.drops = listen_drops()
        self.upgrade = Upgrade(self)
        self.bus = Bus(self)
        self.rates = status.Rates()
        self.scale_state = autoscale.ScaleState()
        self.last_decision: dict[str, object] | None = None
        self.scale_events_count = {"up": 0, "down": 0}
        self.admin: AdminServer | None = None
        self.metrics: ClusterMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.observer: Observer | None = None
        self.sampled_at = 0.0
        self.notifier = Notifier()
        self.host_id = os.urandom(4).hex()  # names this host's processes in ids other hosts route by
        self.redis = RedisLink(self, self.host_id)
        self.announced_generation = 0  # the generation systemd was last told READY=1 for
        self.on_tick: list[Callable[[], None]] = [self.upgrade.tick, self.watch_listen_drops, self.bus.check,
                                                  self.bus.wake, self.every_second]
        self.drops_checked = 0.0
        self.listen_overflows = 0  # since this master started
        self.listen_drops = 0

    def _configured_workers(self) -> int:
        workers = self.config.workers
        return len(allowed_cpus()) if workers == "auto" else int(workers)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        self.secret = self.upgrade.inherited_secret() or self._agreed_secret() or _load_secret(self.config.secret_file)
        self._serve_admin()  # first: a second master must say "already running" before binding anything
        inherited = os.environ.pop(INHERIT_ENV, "")
        activated = activated_sockets()
        if inherited:
            self.groups = inherited_groups(inherited)
        elif activated:
            self.groups = adopt_activated(activated)
            log.info("socket activation: serving %s (bind addresses in the configuration are not used)",
                     ", ".join(g.address for g in self.groups))
        else:
            for host, port in self.config.binds:
                _refuse_if_served(host, port)
            self.groups = [ListenerGroup(host, port) for host, port in self.config.binds]
        for group in self.groups:
            group.ensure(self.max_slots)
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_read = read_fd
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in MASTER_SIGNALS:
            signal.signal(signum, _record_only)
        self.selector.register(read_fd, selectors.EVENT_READ, self._read_signals)
        for slot in self.slots[: self.target]:
            slot.wanted = True
        self._serve_metrics()
        self._title()
        log.info("master %d serving %s with %d workers (generation %d)", self.pid,
                 ", ".join(g.address for g in self.groups), self.target, self.generation)

    def _agreed_secret(self) -> bytes | None:
        """With Redis and no secret_file, every host uses the secret the first one stored there."""
        redis = self.config.redis
        if not redis.url or self.config.secret_file:
            return None
        return bridge.agree_on_secret(redis.url, redis.key_prefix, redis.connect_timeout)

    def _serve_admin(self) -> None:
        from mcpherd.shared.admin import socket_path

        path = socket_path(self.config.admin_socket or None)
        inherited = self.upgrade.inherited_socket("admin")
        try:
            self.admin = AdminServer(path, self.selector, Commands(self).handlers(), inherited)
        except AlreadyRunning as exc:
            raise ConfigError(str(exc)) from None

    def _serve_metrics(self) -> None:
        self.metrics = ClusterMetrics(self)  # folds retired workers' counters even when not served
        self.observer = Observer(self)
        if self.config.metrics_bind == "off":
            return
        routes = {"/metrics": self.metrics.scrape, "/": self.observer.page, "/feed.json": self.observer.feed}
        self.metrics_server = MetricsServer(parse_bind(self.config.metrics_bind), routes)
        self.metrics_server.stream_routes["/events"] = self.observer.feed
        try:
            self.metrics_server.listen(self.upgrade.inherited_socket("metrics"))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.config.metrics_bind}: {exc.strerror}") from None
        self.metrics_server.register(self.selector)

    # -- the Cluster interface of ClusterMetrics -----------------------------------------------
    def live_lanes(self) -> list[LiveLane]:
        return [LiveLane(layout.lane_index(p.slot, p.lane), p.slot, p.pid, p.cell) for p in self.processes()]

    def worker_count(self) -> int:
        return sum(1 for s in self.slots if s.current is not None and s.current.state is State.READY)

    def restarts_total(self) -> int:
        return sum(s.restarts_total for s in self.slots)

    def reloads_total(self) -> int:
        return self.reloads

    def scale_events(self) -> dict[str, int]:
        return dict(self.scale_events_count)

    def alerts_active(self) -> dict[str, str]:
        return dict(self.observer.active) if self.observer is not None else {}

    def cluster_totals(self) -> metrics.Totals:
        assert self.metrics is not None
        return self.metrics.totals(self.live_lanes())

    def timeline(self, kind: str, text: str) -> None:
        if self.observer is not None:
            self.observer.record(kind, text)

    def redis_up(self) -> bool | None:
        return self.redis.up if self.redis.enabled else None

    def redis_ping_s(self) -> float | None:
        return self.redis.ping_s if self.redis.enabled else None

    def restart_latency_s(self) -> float:
        latest = [s.last_restart_latency_ms for s in self.slots if s.last_restart_latency_ms]
        return max(latest) / 1000 if latest else 0.0

    # -- once a second: rates, autoscaling, housekeeping ------------------------------------------
    def every_second(self) -> None:
        now = time.monotonic()
        if self.admin is not None:
            self.admin.tick(now)
        if self.metrics_server is not None:
            self.metrics_server.tick(now)
        if now - self.sampled_at < 1.0:
            return
        self.sampled_at = now
        self.rates.update([p for p in self.processes() if p.state is not State.EXITED], now)
        self.redis.tick(now)
        if self.observer is not None:
            self.observer.tick(status.build(self))
            if self.metrics_server is not None and self.metrics_server.streams:
                self.metrics_server.broadcast(self.observer.snapshot)
        self._tell_systemd(now)
        if self.config.autoscale.enabled and not self.stopping_since:
            self.autoscale(now)

    def _tell_systemd(self, now: float) -> None:
        wanted = [s for s in self.slots if s.wanted]
        serving = [s for s in wanted if s.current is not None and s.current.state is State.READY
                   and s.current.generation == self.generation]
        if wanted and len(serving) == len(wanted) and self.announced_generation != self.generation \
                and not self.stopping_since:
            self.announced_generation = self.generation
            self.notifier.ready(f"generation {self.generation}: {len(serving)} workers")
        rate = sum(self.rates.rate(p.pid) for p in self.processes())
        self.notifier.status(f"{self.worker_count()} workers, {rate:.0f} req/s, generation {self.generation}", now)

    def autoscale(self, now: float) -> None:
        live = [s for s in self.slots if s.wanted and s.current is not None and s.current.state is State.READY]
        if not live:
            return
        queued = sum(accept_queue_length(g.sockets[s.index]) for g in self.groups for s in live)
        measurement = autoscale.Measurement(now, self.target, tuple(self.rates.busy_ratio(s.current.pid)
                                                                       for s in live if s.current), queued)
        decision, self.scale_state = autoscale.decide(measurement, self.scale_state, self.config.autoscale,
                                                      len(self.cpu_order))
        wanted = min(decision.target, self.max_slots)  # a reload may raise max_workers past the slots made at start
        if decision.direction != "hold" and wanted != self.target:
            self.scale_events_count[decision.direction] += 1
            self.last_decision = {"at": time.time(), "direction": decision.direction, "reason": decision.reason}
            log.info("autoscale %s to %d workers: %s", decision.direction, wanted, decision.reason)
            self.timeline("autoscale", f"{decision.direction} to {wanted}: {decision.reason}")
            self.set_target(wanted, f"autoscale: {decision.reason}")

    # -- what the status document needs --------------------------------------------------------
    def autoscale_status(self) -> dict[str, object]:
        policy = self.config.autoscale
        return {"enabled": policy.enabled, "min": policy.min_workers,
                "max": min(policy.max_workers or len(self.cpu_order), self.max_slots),
                "last_decision": self.last_decision, "scale_events": dict(self.scale_events_count)}

    def _totals(self) -> dict[str, int]:
        if self.metrics is not None:
            return self.metrics.totals(self.live_lanes()).counters
        counters: dict[str, int] = {}
        for proc in self.processes():
            for name, field in metrics.COUNTER_FIELDS.items():
                counters[name] = counters.get(name, 0) + proc.cell.get(field)
        return counters

    def metrics_retired_requests(self) -> int:
        return self.metrics.retired.counters["http_requests"] if self.metrics is not None else 0

    def alerts_status(self) -> list[dict[str, str]]:
        return [{"alert": name, "reason": why} for name, why in self.alerts_active().items()]

    def cache_totals(self) -> tuple[int, int]:
        counters = self._totals()
        return counters["cache_hits"], counters["cache_misses"]

    def errors_total(self) -> int:
        return self._totals()["errors"]

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.setup()
        while self.running:
            self.sleep()
            self.bus.wake()  # what this turn's messages published, before the rest of the turn
            self.dispatch_signals()
            self.reap()
            self.check_workers()
            self.reconcile()
            for hook in self.on_tick:
                hook()
            self.notifier.watchdog(time.monotonic())  # only from a loop turn that completed
        self.teardown()
        return self.exit_code

    def sleep(self) -> None:
        for key, _ in self.selector.select(TICK_S):
            key.data()

    def _read_signals(self) -> None:
        try:
            self.signals.extend(os.read(self._wakeup_read, 4096))
        except BlockingIOError:
            pass

    def dispatch_signals(self) -> None:
        queued, self.signals = self.signals, []
        for signum in queued:
            name = signal.Signals(signum).name[3:].lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    # -- signal handlers (called from the loop, never from signal context) ---------------------
    def handle_chld(self) -> None:
        pass  # reap() runs every turn anyway

    def handle_hup(self) -> None:
        self.reload()

    def handle_term(self) -> None:
        if self.upgrade.superseded():
            log.info("the new master took over; draining this master's workers")
        self.stop(graceful=True)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_ttin(self) -> None:
        self.set_target(self.target + 1, "SIGTTIN")

    def handle_ttou(self) -> None:
        self.set_target(self.target - 1, "SIGTTOU")

    def handle_usr1(self) -> None:
        from mcpherd.cli import reopen_log_file

        reopen_log_file()
        for proc in self.processes():
            control.send(proc.channel, control.ReopenLogs())

    def handle_usr2(self) -> None:
        self.upgrade.start()

    # -- verbs ---------------------------------------------------------------------------------
    def set_target(self, count: int, why: str) -> None:
        """Desired state only: pick which slots are wanted; reconcile() acts on it.

        Scale-up takes the lowest free slots; scale-down retires the workers with the fewest open
        streams (their clients have the least to lose), the highest slot on a tie.
        """
        if not 1 <= count <= self.max_slots:
            log.warning("%s: the worker count stays within 1..%d (asked for %d)", why, self.max_slots, count)
        count = max(1, min(count, self.max_slots))
        if count != self.target:
            log.info("target workers %d -> %d (%s)", self.target, count, why)
            self.timeline("scale", f"{self.target} -> {count} workers ({why})")
        self.target = count
        wanted = [s for s in self.slots if s.wanted]
        for slot in [s for s in self.slots if not s.wanted][: max(0, count - len(wanted))]:
            slot.wanted = True
        if len(wanted) > count:
            by_streams = sorted(wanted, key=lambda s: (_streams(s), -s.index))
            for slot in by_streams[: len(wanted) - count]:
                slot.wanted = False

    def reload(self) -> None:
        """SIGHUP: re-read the configuration, then roll a new generation over every slot."""
        try:
            config = load(self.config_path, self.overrides)
        except ConfigError as exc:
            self.reload_failed = str(exc)
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.reloading()  # Type=notify-reload waits for RELOADING=1 then READY=1
            self.notifier.ready(f"reload refused: {exc}")
            return
        if config.binds != self.config.binds:
            log.warning("bind addresses cannot change on reload (restart the service); keeping %s",
                        ", ".join(self.config.bind))
            config.bind = self.config.bind
        workers_changed = config.workers != self.config.workers
        self.config = config
        self.notifier.reloading()
        self.generation += 1
        self.reloads += 1
        if workers_changed:
            self.set_target(self._configured_workers(), "reload: workers changed in the configuration")
        self.reload_failed = ""
        log.info("reloading: starting generation %d", self.generation)
        self.timeline("reload", f"generation {self.generation} starting")
        self._title()

    def stop(self, graceful: bool) -> None:
        if not self.stopping_since:
            self.stopping_since = time.monotonic()
            if not self.upgrade.handed_over:  # a hand-over is not the service stopping
                self.notifier.stopping()
            log.info("%s stop requested", "graceful" if graceful else "immediate")
        self.target = 0
        self.redis.stop()
        for slot in self.slots:
            slot.wanted = False
        if self.admin is not None and not graceful:
            self.admin.close(unlink=not self.upgrade.handed_over)
            self.admin = None
        for proc in self.processes():
            if graceful:
                self.stop_proc(proc, "master stopping", control.Stop())
            else:
                _kill(proc.pid, signal.SIGQUIT)
                proc.stop_deadline = min(proc.stop_deadline or 1e18, time.monotonic() + 1.0)

    def stop_proc(self, proc: Proc, reason: str, verb: control.Stop | control.Retire) -> None:
        """Ask a worker to finish (over its channel; SIGTERM when the channel is gone)."""
        if proc.state in (State.DRAINING, State.EXITED):
            return
        proc.state = State.DRAINING
        proc.stop_reason = reason
        proc.stop_deadline = time.monotonic() + self.config.graceful_timeout + 1.0
        if not control.send(proc.channel, verb):
            _kill(proc.pid, signal.SIGTERM)

    def spawn(self, slot: Slot, generation: int) -> Proc:
        lane = slot.free_lane()
        master_end, worker_end = control.channel()
        launch = WorkerLaunch(self.worker_config(slot, lane, generation), slot.index, lane, slot.cpu, generation,
                              tuple(g.sockets[slot.index] for g in self.groups), worker_end, self.segment,
                              frozenset(_log_fds()))
        cell = self.segment.cell(layout.lane_index(slot.index, lane))
        cell.clear()
        pid = fork_worker(launch)
        worker_end.close()
        sender = control.Sender(master_end, lambda writable: self._watch_channel(proc, writable))
        proc = Proc(pid, slot.index, lane, generation, slot.cpu, master_end, sender, control.Receiver(master_end), cell,
                    time.monotonic(),
                    request_limit=policy.recycle_limit(self.config.max_requests, self.config.max_requests_jitter,
                                                       self.rng))
        self.selector.register(master_end, selectors.EVENT_READ, lambda: self._channel_ready(proc))
        return proc

    def worker_config(self, slot: Slot, lane: int, generation: int) -> WorkerConfig:
        c = self.config
        return WorkerConfig(app=c.app, slot=slot.index, lane=lane, generation=generation, secret=self.secret,
                            host=self.host_id, redis=c.redis, metrics=c.metrics_bind != "off",
                            tool_threads=c.tool_threads, graceful_timeout=c.graceful_timeout,
                            max_sessions=c.max_sessions, resume_buffer_mb=c.resume_buffer_mb,
                            allowed_hosts=list(c.allowed_hosts), allowed_origins=list(c.allowed_origins))

    def send(self, proc: Proc, message: control.Message) -> bool:
        """To a worker, in order; what does not fit in its channel waits for room (control.Sender)."""
        return proc.sender.send(message)

    def _channel_ready(self, proc: Proc) -> None:
        if proc.sender.waiting:
            proc.sender.drain()
        self._channel_readable(proc)

    def _watch_channel(self, proc: Proc, writable: bool) -> None:
        """The selector reports room in the channel only while something waits to be sent."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        try:
            self.selector.modify(proc.channel, events, lambda: self._channel_ready(proc))
        except (KeyError, ValueError):  # unregistered: the worker closed its end
            pass

    def _channel_readable(self, proc: Proc) -> None:
        while True:
            try:
                received = proc.receiver.receive()
            except (BlockingIOError, InterruptedError):
                return
            except (ValueError, OSError) as exc:
                log.error("control channel of worker %d: %s", proc.pid, exc)
                return
            if received is None:  # the worker closed its end (it is exiting)
                _unregister(self.selector, proc.channel)
                return
            self.bus.on_message(proc, *received)

    # -- reaping -------------------------------------------------------------------------------
    def reap(self) -> None:
        # A signal sent to the whole group (Ctrl-C, killpg, systemd's KillMode) reaches the workers
        # too: act on it before their exits, or they would look like deaths to restart.
        self._read_signals()
        self.dispatch_signals()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # ECHILD: nothing to reap
                return
            if pid == 0:
                return
            if self.upgrade.reaped(pid, status) or self.redis.reaped(pid, _describe(status)):
                continue
            proc = self.find(pid)
            if proc is not None:
                self.exited(proc, _describe(status), os.waitstatus_to_exitcode(status))

    def exited(self, proc: Proc, how: str, code: int) -> None:
        slot = self.slots[proc.slot]
        proc.state = State.EXITED
        proc.exit_status = how
        _unregister(self.selector, proc.channel)
        proc.channel.close()
        self.bus.forget(proc)
        if self.metrics is not None:
            self.metrics.fold(layout.lane_index(proc.slot, proc.lane), proc.cell)
        if proc in slot.retiring:
            slot.retiring.remove(proc)
            log.info("worker %d (slot %d, gen %d) exited after %s: %s", proc.pid, slot.index, proc.generation,
                     proc.stop_reason, how)
            return
        if proc is slot.successor:
            slot.successor = None
            self._successor_failed(slot, proc, how, code)
            return
        if proc is slot.current:
            slot.current = None
            if slot.wanted and not self.stopping_since:
                self._record_death(slot, proc, how, code)

    def _record_death(self, slot: Slot, proc: Proc, how: str, code: int) -> None:
        now = time.monotonic()
        reason = "application failed to load" if code == EXIT_APP_LOAD_ERROR else how
        if proc.aborted_at:  # the master killed it: say why (a stop_reason may only name a pending replacement)
            reason = proc.stop_reason
        slot.died_at = now
        slot.restarts_total += 1
        self.timeline("restart", f"slot {slot.index}: worker {proc.pid} died ({reason})")
        slot.last_restart_reason = reason
        policy.record_restart(slot.restarts, now, self.config.restart.window_s)
        intensity = policy.Intensity(self.config.restart.max_restarts, self.config.restart.window_s,
                                     backoff_max_s=self.config.restart.backoff_max_s)
        decision = policy.restart_decision(slot.restarts, now, intensity, slot.strikes)
        if decision.tripped:
            slot.strikes += 1
            slot.backoff_until = now + decision.delay_s
            log.error("slot %d (cpu %d): worker %d died (%s); %s", slot.index, slot.cpu, proc.pid, reason,
                      decision.reason)
        else:
            slot.strikes = 0
            log.warning("slot %d (cpu %d): worker %d died (%s); restarting", slot.index, slot.cpu, proc.pid, reason)

    def _successor_failed(self, slot: Slot, proc: Proc, how: str, code: int) -> None:
        if code < 0 and not proc.aborted_at and self._retry_successor(slot, proc, how):
            return
        why = "the application failed to load" if code == EXIT_APP_LOAD_ERROR else f"it exited ({how})"
        if proc.generation > (slot.current.generation if slot.current else 0):
            self.reload_failed = f"generation {proc.generation} did not start: {why}"
            log.error("reload failed, generation %d keeps serving: %s", self.generation - 1, self.reload_failed)
            self.timeline("reload", f"failed: {self.reload_failed}")
            self.generation -= 1  # the running generation is the previous one again
            self.notifier.ready(f"reload failed: {why}")
            for other in self.slots:
                if other.successor is not None and other.successor.generation > self.generation:
                    self.stop_proc(other.successor, "reload abandoned", control.Stop())
                    other.retiring.append(other.successor)
                    other.successor = None
        else:
            log.error("slot %d: replacement worker %d exited before serving: %s", slot.index, proc.pid, why)

    def _retry_successor(self, slot: Slot, proc: Proc, how: str) -> bool:
        """A replacement killed from outside (kill -9, the OOM killer) says nothing about the new code:
        start another (reconcile does) unless the slot exceeds its restart intensity."""
        now = time.monotonic()
        policy.record_restart(slot.restarts, now, self.config.restart.window_s)
        intensity = policy.Intensity(self.config.restart.max_restarts, self.config.restart.window_s,
                                     backoff_max_s=self.config.restart.backoff_max_s)
        if policy.restart_decision(slot.restarts, now, intensity, slot.strikes).tripped:
            return False
        slot.restarts_total += 1
        log.warning("slot %d: replacement worker %d was %s before serving; starting another", slot.index,
                    proc.pid, how)
        return True

    # -- checks --------------------------------------------------------------------------------
    def check_workers(self) -> None:
        now, now_ns = time.monotonic(), time.monotonic_ns()
        for slot in self.slots:
            for proc in slot.processes():
                self._check_ready(slot, proc, now)
                self._check_stalled(proc, now, now_ns)
                if proc.stop_deadline and now > proc.stop_deadline:
                    _kill(proc.pid, signal.SIGKILL)
            self._check_recycle(slot)

    def _check_ready(self, slot: Slot, proc: Proc, now: float) -> None:
        if proc.state is not State.SPAWNING or proc.cell.get(layout.F_STATE) != layout.READY:
            return
        proc.state = State.READY
        proc.ready_at = now
        if slot.died_at and proc is slot.current:
            ready_ns = proc.cell.get(layout.F_READY_AT)
            slot.last_restart_latency_ms = max(0.0, ready_ns / 1e6 - slot.died_at * 1e3)
            log.info("slot %d: worker %d accepting %.1f ms after its predecessor died", slot.index, proc.pid,
                     slot.last_restart_latency_ms)
            slot.died_at = 0.0
        if proc is slot.successor:  # hand the slot over: the new worker first, so capacity never dips
            old = slot.current
            slot.current, slot.successor = proc, None
            if old is not None:
                self.stop_proc(old, old.stop_reason or "replaced", control.Stop())
                slot.retiring.append(old)

    def _check_stalled(self, proc: Proc, now: float, now_ns: int) -> None:
        """A loop that has not turned for --timeout gets SIGABRT (traceback), then SIGKILL."""
        if proc.aborted_at:
            if now - proc.aborted_at > ABORT_GRACE_S:
                _kill(proc.pid, signal.SIGKILL)
            return
        started = proc.state is State.SPAWNING and now - proc.spawned_at > self.config.timeout
        stalled = proc.state in (State.READY, State.DRAINING) and proc.heartbeat_age(now_ns) > self.config.timeout
        if started or stalled:
            what = "did not start" if started else f"event loop stalled for {proc.heartbeat_age(now_ns):.1f}s"
            log.error("worker %d (slot %d) %s: SIGABRT", proc.pid, proc.slot, what)
            proc.stop_reason = what
            proc.aborted_at = now
            _kill(proc.pid, signal.SIGABRT)

    def _check_recycle(self, slot: Slot) -> None:
        proc = slot.current
        if proc is None or proc.state is not State.READY or slot.successor is not None or not slot.wanted \
                or not slot.has_free_lane():
            return
        reason = ""
        if proc.request_limit and proc.requests >= proc.request_limit:
            reason = f"recycled after {proc.requests} requests"
        elif self.config.max_rss_mb and _rss_mb(proc.pid) > self.config.max_rss_mb:
            reason = f"recycled above {self.config.max_rss_mb} MB resident"
        if reason:
            log.info("slot %d: worker %d %s", slot.index, proc.pid, reason)
            proc.stop_reason = reason
            slot.successor = self.spawn(slot, proc.generation)

    # -- reconcile -----------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Converge the slots to the desired state: `target` workers of `generation`."""
        now = time.monotonic()
        if self.stopping_since:
            self._finish_stop(now)
            return
        self._steer()  # first: a slot about to retire stops receiving connections before it is told
        for slot in self.slots:
            self._reconcile_slot(slot, now)
        self._steer()  # again: include slots that just got a worker
        if all(s.in_backoff(now) for s in self.slots if s.wanted) and any(s.wanted for s in self.slots):
            log.critical("every worker slot exceeded its restart intensity: giving up (exit %d)", EXIT_GAVE_UP)
            self.exit_code = EXIT_GAVE_UP
            self.stop(graceful=False)
        self._title()

    def _reconcile_slot(self, slot: Slot, now: float) -> None:
        if not slot.wanted:
            if slot.current is not None:  # scale-down: already steered away by _steer
                log.info("slot %d: retiring worker %d", slot.index, slot.current.pid)
                self.stop_proc(slot.current, "scaled down", control.Retire())
                slot.retiring.append(slot.current)
                slot.current = None
            return
        if slot.current is None:
            if slot.in_backoff(now) or slot.successor is not None or not slot.has_free_lane():
                return
            slot.backoff_until = 0.0
            slot.current = self.spawn(slot, self.generation)
        elif slot.current.generation < self.generation and slot.successor is None \
                and slot.current.state is State.READY and not self.reload_failed and slot.has_free_lane():
            slot.current.stop_reason = f"replaced by generation {self.generation}"
            slot.successor = self.spawn(slot, self.generation)

    def _steer(self) -> None:
        """New connections go to slots whose worker accepts now; only while none does (start-up), to
        every wanted slot not backing off, where they wait for their worker."""
        now = time.monotonic()
        ready = [s.index for s in self.slots
                 if s.wanted and s.current is not None and s.current.state is State.READY]
        live = ready or [s.index for s in self.slots if s.wanted and (s.accepting() or not s.in_backoff(now))]
        if not live:
            return
        for group in self.groups:
            group.steer(live)

    def _finish_stop(self, now: float) -> None:
        if not self.processes() and (not self.redis.pid or now - self.stopping_since > 5.0):
            self.running = False

    def teardown(self) -> None:
        log.info("master %d exiting (%d)", self.pid, self.exit_code)
        if self.admin is not None:
            self.admin.close(unlink=not self.upgrade.handed_over)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.upgrade.handed_over:
            return  # the new master owns the sockets and paths now
        for group in self.groups:
            for sock in group.sockets:
                sock.close()

    def watch_listen_drops(self) -> None:
        """Log accept-queue overflows and drops (TcpExt counters, this network namespace) once a second."""
        now = time.monotonic()
        if now - self.drops_checked < 1.0:
            return
        self.drops_checked = now
        overflows, drops = listen_drops()
        new_overflows, new_drops = overflows - self.drops[0], drops - self.drops[1]
        self.drops = (overflows, drops)
        if new_overflows > 0 or new_drops > 0:
            self.listen_overflows += new_overflows
            self.listen_drops += new_drops
            log.warning("listen queues overflowed %d times and dropped %d connections in the last second "
                        "(network-namespace wide; raise net.core.somaxconn or add workers)", new_overflows,
                        new_drops)

    # -- helpers -------------------------------------------------------------------------------
    def processes(self) -> list[Proc]:
        return [p for slot in self.slots for p in slot.processes()]

    def find(self, pid: int) -> Proc | None:
        return next((p for p in self.processes() if p.pid == pid), None)

    def _title(self) -> None:
        ready = sum(1 for s in self.slots if s.current is not None and s.current.state is State.READY)
        setproctitle(f"mcpherd: master [gen {self.generation}] {ready} workers "
                     + " ".join(g.address for g in self.groups))


def _refuse_if_served(host: str, port: int) -> None:
    """SO_REUSEPORT lets a second server of the same user join the port and silently take half of its
    connections; refuse to start on an address something already answers on."""
    if port == 0:
        return
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    family = socket.AF_INET6 if ":" in probe_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((probe_host, port)) == 0:
            raise ConfigError(f"{host}:{port} is already served by another process (another mcpherd?); "
                              "refusing to share its port")


def _streams(slot: Slot) -> int:
    return slot.current.cell.get(layout.F_STREAMS) if slot.current is not None else 0


def _record_only(signum: int, frame: object) -> None:
    """Signal handlers do nothing: the wakeup fd already queued the signal number for the loop."""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # ESRCH: already gone, reap() will see it
        pass


def _unregister(selector: selectors.BaseSelector, sock: socket.socket) -> None:
    try:
        selector.unregister(sock)
    except (KeyError, ValueError):
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def _log_fds() -> list[int]:
    fds = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                fds.append(stream.fileno())
            except (OSError, ValueError):
                pass
    return fds


def _load_secret(path: str) -> bytes:
    if not path:
        return os.urandom(32)
    try:
        secret = open(path, "rb").read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret_file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"secret_file {path} must hold at least 16 bytes")
    return secret


def serve(config: Config, config_path: str | None, overrides: dict[str, object]) -> int:
    master = Master(config, config_path, overrides)
    try:
        return master.run()
    except ConfigError as exc:
        print(f"mcpherd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            print(f"mcpherd: cannot listen: {exc.strerror}", file=sys.stderr)
            return 1
        raise
    finally:
        if master.admin is not None and master.running:  # setup failed half-way: leave nothing behind
            master.admin.close(unlink=True)
