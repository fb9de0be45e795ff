"""The pre-fork supervisor: bind, fork, watch heartbeats, reap, respawn, stop.

Imports from fastproxy only ``errors``, ``config``, ``log`` and ``metrics``; ``worker`` is imported
lazily, and only for its ``run`` entry point, so the master never loads asyncio or uvloop itself.

Theory of operation (gunicorn's arbiter, made smaller and typed):

- ``run`` binds every listener and the admin socket, raises ``RLIMIT_NOFILE``, empties the
  metrics directory, installs the signal handlers and forks ``config.workers`` children. Each
  child inherits the bound sockets and the write end of its own heartbeat pipe.
- The main loop waits (at most ``SELECT_TIMEOUT_S``) on a self-pipe that ``signal.set_wakeup_fd``
  writes to and on every heartbeat pipe, then: dispatches queued signals to ``handle_<signame>``,
  reaps with ``waitpid(-1, WNOHANG)``, kills workers whose heartbeat went stale, and spawns
  workers up to the target count.
- A worker that exits with ``EXIT_WORKER_BOOT`` before its first heartbeat byte failed to boot:
  the master stops everything and exits 3 instead of respawning a broken build forever. Any other
  exit is a crash, answered with a WARNING and a throttled respawn.

Invariants:

- Signal handlers only append to a queue; they never log (a handler may interrupt a log call
  that holds the handler's lock).
- The master is single-threaded, never creates an event loop and never serves traffic.
- No worker outlives ``run``: every way out (stop, ``HaltServer``, any exception) goes through a
  ``finally`` that SIGKILLs and reaps the remaining children. On Linux each child also asks the
  kernel for SIGTERM when the master dies without cleaning up.
- The forked child never returns into the master's code: its entry point ends in ``os._exit``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import NoReturn

from fastproxy import control, log, metrics, systemd, tls
from fastproxy.checker import Checker, Probe
from fastproxy.config import Address, Config, dump_config
from fastproxy.errors import EXIT_OK, EXIT_WORKER_BOOT, ConfigError, FastproxyError, HaltServer
from fastproxy.health import Change, HealthBoard
from fastproxy.runtime import Snapshot, diff

logger = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None

#: ``(config, sockets, admin_socket, channel_fd, generation)``: the worker's entry point
WorkerTarget = Callable[[Config, Mapping[str, socket.socket], socket.socket | None, int, int], None]
#: re-reads the configuration for a reload (raises ``ConfigError``)
ConfigLoader = Callable[[], Config]

#: listen(2) backlog; the kernel caps it at net.core.somaxconn. nginx uses 511, HAProxy and
#: gunicorn 2048: bursts of SDK reconnects after a deploy are what this absorbs.
LISTEN_BACKLOG = 2048
#: longest the main loop sleeps; heartbeat checks and delayed respawns run at this resolution
SELECT_TIMEOUT_S = 1.0
#: a worker still alive this long after SIGABRT (missed heartbeat) gets SIGKILL
KILL_AFTER_ABORT_S = 5.0
#: crash-loop throttle: this many unexpected exits of one slot within the window respawn at
#: once; beyond that each respawn waits twice as long as the last, up to the maximum
RESPAWN_BURST = 5
RESPAWN_WINDOW_S = 10.0
RESPAWN_BACKOFF_START_S = 1.0
RESPAWN_BACKOFF_MAX_S = 30.0
#: a worker that lived this long before it crashed resets its slot's throttle
RESPAWN_STABLE_S = 10.0
#: bytes read from the signal wake-up pipe at once
WAKEUP_READ_BYTES = 4096
#: how much longer than ``graceful_timeout_s`` the master waits before its SIGKILL
STOP_MARGIN_S = 5.0
#: what a SIGQUIT (fast stop) or an escalated stop waits for SIGKILLed workers to be reaped
FAST_STOP_TIMEOUT_S = 5.0
#: the systemd watchdog is fed only while every worker sent a heartbeat this recently (the
#: workers beat once a second; a stuck one stops the pings long before its SIGABRT)
WATCHDOG_FRESH_S = 5.0
#: RLIMIT_NOFILE to aim for when the hard limit is unlimited (Linux fs.nr_open default)
NOFILE_WHEN_UNLIMITED = 1 << 20

#: signals the master handles; each has a ``handle_<name>`` method, except SIGCHLD, whose only
#: job is to wake the loop so that reaping happens at once
HANDLED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGCHLD,
)


class BindError(FastproxyError):
    """A listening socket could not be bound; ``str()`` names the listener and the address."""


@dataclass(slots=True)
class Worker:
    """The master's view of one child."""

    pid: int
    #: index in ``range(config.workers)``; a respawn takes over the slot of the dead worker
    slot: int
    #: the master's end of the control channel (heartbeats in, reloads out); None once closed
    channel: socket.socket | None
    #: ``time.monotonic()`` at fork
    started: float
    #: ``time.monotonic()`` of the last heartbeat byte (of the fork until the first byte)
    last_beat: float
    #: the worker sent its first heartbeat byte: it is accepting
    ready: bool = False
    #: ``time.monotonic()`` when the master sent SIGABRT for a stale heartbeat
    aborted_at: float | None = None
    #: the master already sent SIGKILL
    killed: bool = False
    #: sent SIGTERM because ``workers`` shrank on a reload: its exit is not a crash
    retiring: bool = False
    #: why the master replaces it (``fastproxy_worker_restarts_total``); "" when it is not
    restart_reason: str = ""
    #: the last health table could not be sent (its channel was full): sent again next pass
    health_behind: bool = False


@dataclass(slots=True)
class Slot:
    """Respawn bookkeeping for one worker slot, kept across the workers that fill it."""

    #: ``time.monotonic()`` of recent unexpected exits, oldest first
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    #: the current respawn delay; 0 while the slot is not crash-looping
    backoff_s: float = 0.0
    #: ``time.monotonic()`` before which the slot is not refilled
    not_before: float = 0.0


def bind_listener(where: str, address: Address) -> socket.socket:
    """Return a non-blocking socket listening on ``address``; ``BindError`` names ``where``."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise BindError(f"{where}: cannot bind {address}: {err}") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As nginx does: "[::]:443" is IPv6 only, so an IPv4 listener may share the port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise BindError(f"{where}: cannot bind {address}: {err}") from err
    return sock


def describe_exit(status: int) -> str:
    """Return why a child with wait ``status`` ended, for a log line."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum == signal.SIGKILL:
            return f"killed by {name} (perhaps out of memory?)"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == EXIT_WORKER_BOOT:
            return f"exited with code {code} (an exception escaped it, traceback logged)"
        return f"exited with code {code}"
    return f"ended with wait status {status}"


def raise_nofile_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit: each connection costs two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as err:
        logger.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, err)
    else:
        logger.debug("open-files limit raised from %d to %d", soft, target)


def _ask_for_death_signal(master_pid: int) -> None:
    """Have the kernel SIGTERM this child when the master dies (Linux ``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # only the child needs it, only on Linux

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != master_pid:
        # The master died between fork and prctl: the signal will never come.
        os._exit(EXIT_OK)


class Master:
    """Supervise a pool of forked workers serving ``config``; ``run()`` returns the exit code."""

    def __init__(
        self,
        config: Config,
        *,
        worker_target: WorkerTarget | None = None,
        loader: ConfigLoader | None = None,
    ) -> None:
        if worker_target is None:
            # Imported here so that importing the master does not load asyncio and uvloop.
            from fastproxy.worker import run

            worker_target = run
        self._config = config
        self._loader = loader
        self._snapshot = Snapshot.build(config, 1)
        self._worker_target = worker_target
        self._pid = os.getpid()
        self._sockets: dict[str, socket.socket] = {}
        self._admin_socket: socket.socket | None = None
        self._workers: dict[int, Worker] = {}
        self._slots = [Slot() for _ in range(config.workers)]
        self._signal_queue: collections.deque[int] = collections.deque()
        self._selector = selectors.DefaultSelector()
        self._wakeup_r = -1
        self._wakeup_w = -1
        self._previous_handlers: dict[int, _Handler] = {}
        self._all_ready_announced = False
        self._stopping = False
        self._exit_code: int | None = None
        self._metrics_dir: str | None = None
        self._metrics: metrics.MasterMetrics | None = None
        #: pids of the workers that have not acknowledged the current generation yet
        self._reload_pending: set[int] = set()
        #: why workers could not apply the current generation
        self._reload_errors: list[str] = []
        #: a SIGHUP arrived while a reload was pending: read the file again once it is applied
        self._hup_again = False
        #: systemd's watchdog interval (WATCHDOG_USEC), None when no watchdog is asked for
        self._watchdog_s: float | None = None
        self._last_watchdog = 0.0
        #: upstream health, decided here once for every worker (active checks, passive reports)
        self._health = HealthBoard()
        self._health.sync(config.upstreams, time.monotonic())
        self._checker = Checker(self._health, self._selector)
        # the client contexts of the checks of TLS upstreams (``cli`` has checked the files)
        self._checker.use_tls(tls.build(config).upstreams)

    def _check_nofile_limit(self) -> None:
        """Warn, once at start, when the open-files limit cannot hold ``max_connections``."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        capacity = self._snapshot.client_capacity(soft)
        wanted = self._snapshot.max_clients()
        if capacity < wanted:
            logger.warning(
                "the open-files limit %d lets a worker hold about %d client connections, fewer "
                "than the %d its listeners' max_connections allow: connections over it are "
                "answered 503 overloaded (raise LimitNOFILE or lower max_connections)",
                soft,
                capacity,
                wanted,
            )

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Bind, fork the workers and supervise them until stopped; return the exit code.

        Raises ``BindError`` before any child exists when a socket cannot be bound.
        """
        try:
            self._bind_all()
            raise_nofile_limit()
            self._check_nofile_limit()
            self._metrics_dir = metrics.prepare_multiproc_dir()
            self._metrics = metrics.MasterMetrics(time.time())
            self._watchdog_s = systemd.watchdog_interval_s()
            self._install_signals()
            self._manage_workers()
            timeout = SELECT_TIMEOUT_S
            if self._watchdog_s is not None:
                timeout = min(timeout, self._watchdog_s / 4)  # fed at half, woken at a quarter
            while True:
                self._wait_for_events(self._health_timeout(timeout))
                self._dispatch_signals()
                if self._exit_code is not None:
                    return self._exit_code
                self._reap_workers()
                self._murder_workers()
                self._manage_workers()
                self._run_health()
                self._feed_watchdog()
        except HaltServer as halt:
            logger.error("%s; stopping", halt.reason)
            self._stop(graceful=True)
            return halt.exit_code
        finally:
            self._checker.close_all()
            self._kill_and_reap_all()
            self._close_sockets()
            self._restore_signals()
            self._selector.close()
            if self._metrics_dir is not None:
                metrics.remove_multiproc_dir(self._metrics_dir)

    def _stop(self, *, graceful: bool) -> None:
        """Close the listeners, stop the workers and wait; what outlives the wait gets SIGKILL."""
        systemd.notify_stopping()
        self._stopping = True
        self._checker.close_all()
        self._reload_pending.clear()  # draining workers acknowledge nothing more
        self._hup_again = False
        self._close_sockets()
        if graceful:
            # the workers end their own drain at graceful_timeout_s, answering what is left;
            # SIGKILL is for a worker that cannot
            timeout = self._config.graceful_timeout_s + STOP_MARGIN_S
            logger.info(
                "stopping %d workers gracefully (up to %.0f s)", len(self._workers), timeout
            )
            self._signal_workers(signal.SIGTERM)
        else:
            timeout = FAST_STOP_TIMEOUT_S
            logger.info("stopping %d workers now", len(self._workers))
            self._signal_workers(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self._workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait_for_events(min(SELECT_TIMEOUT_S, remaining))
            while self._signal_queue:
                signum = self._signal_queue.popleft()
                if graceful and signum in (signal.SIGINT, signal.SIGQUIT):
                    # A second Ctrl-C, or an explicit fast stop, cuts the drain short.
                    logger.info("%s during a graceful stop: killing the workers now", _name(signum))
                    graceful = False
                    self._signal_workers(signal.SIGKILL)
                    deadline = time.monotonic() + FAST_STOP_TIMEOUT_S
            self._reap_workers()
        if self._workers:
            logger.warning(
                "%d workers did not stop within %.0f s; killing them", len(self._workers), timeout
            )

    def _kill_and_reap_all(self) -> None:
        """SIGKILL and reap every remaining worker (the last line of ``run``)."""
        self._stopping = True
        self._signal_workers(signal.SIGKILL)
        for pid in list(self._workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._forget(self._workers[pid])
            self._mark_dead(pid)

    # -- signals ------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Queue ``signum`` for the main loop. NO LOGGING here, nor anything that takes a lock."""
        if signum != signal.SIGCHLD:
            self._signal_queue.append(signum)

    def _restore_signals(self) -> None:
        if self._wakeup_w == -1:
            return
        signal.set_wakeup_fd(-1)
        for signum, previous in self._previous_handlers.items():
            # None: the previous handler was not installed from Python and cannot be put back.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous_handlers.clear()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        self._wakeup_r = self._wakeup_w = -1

    def _dispatch_signals(self) -> None:
        while self._signal_queue and self._exit_code is None:
            signum = self._signal_queue.popleft()
            handler: Callable[[], None] = getattr(self, "handle_" + _name(signum)[3:].lower())
            handler()

    def handle_term(self) -> None:
        """SIGTERM: stop accepting, let the workers drain, exit 0."""
        logger.info("SIGTERM received: graceful stop")
        self._stop(graceful=True)
        self._exit_code = EXIT_OK

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C): the same graceful stop as SIGTERM; a second one kills the workers."""
        logger.info("SIGINT received: graceful stop")
        self._stop(graceful=True)
        self._exit_code = EXIT_OK

    def handle_quit(self) -> None:
        """SIGQUIT: fast stop, the workers are killed without draining."""
        logger.info("SIGQUIT received: fast stop")
        self._stop(graceful=False)
        self._exit_code = EXIT_OK

    def handle_hup(self) -> None:
        """SIGHUP: read the configuration again and apply it in the live workers."""
        if self._stopping:
            return
        if self._reload_pending:
            # the newest file wins, once the workers have what they are applying now
            logger.info("SIGHUP during a reload: the file is read again once this one is applied")
            self._hup_again = True
            return
        self._reload()

    def handle_usr1(self) -> None:
        """SIGUSR1: reopen log files after rotation."""
        count = log.reopen()
        logger.info("SIGUSR1 received: reopened %d log files in the master", count)
        self._signal_workers(signal.SIGUSR1)  # each worker reopens its own descriptors

    # -- reload -------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Validate the file; bind what it adds; send it to every worker; resize the pool.

        On any error nothing changes: the workers keep serving the current generation.
        """
        current = self._snapshot.generation
        if self._loader is None:
            logger.warning("SIGHUP: no configuration file to reload")
            return
        systemd.notify_reloading()
        generation = current + 1
        added: dict[str, socket.socket] = {}
        try:
            config = self._loader()
            snapshot = Snapshot.build(config, generation)
            contexts = tls.build(config)  # the certificates as the workers will read them
            changes = diff(self._snapshot, snapshot)
            if changes.admin:
                raise ConfigError(
                    "the admin listener cannot move on a reload (restart to apply it)",
                    where="admin",
                    source=config.source,
                )
            for name in changes.bind:
                added[name] = bind_listener(f"listeners.{name}", config.listeners[name].bind)
            text = dump_config(config)
            message = control.Reload(generation, config.source, text, added)
            control.encode_reload(message)  # a configuration too large for the channel fails here
        except (FastproxyError, OSError) as err:
            for sock in added.values():
                sock.close()
            # counted before it is said: whoever reads the log line finds the counter moved
            self._count_reload(ok=False)
            logger.warning("reload failed, still serving generation %d: %s", current, err)
            self._notify_ready_or_status(f"{self._status()}; the last reload failed: {err}")
            return
        for name in changes.close:
            if name in self._sockets:
                self._sockets.pop(name).close()  # the workers close theirs; connections finish
                logger.info("listener %s closed (generation %d)", name, generation)
        for name, sock in added.items():
            self._sockets[name] = sock
            logger.info(
                "listening on %s (listener %s, generation %d)", _sockname(sock), name, generation
            )
        self._config = config
        self._snapshot = snapshot
        self._checker.use_tls(contexts.upstreams)
        for change in self._health.sync(config.upstreams, time.monotonic()):
            self._log_change(change)
        self._resize_pool(config.workers)
        self._reload_errors = []
        self._reload_pending = set()
        for worker in self._workers.values():
            if worker.retiring or worker.channel is None:
                continue
            try:
                control.send_reload(worker.channel, message)
            except OSError as err:
                # a worker left on an older generation would serve it silently: replace it
                # (its slot is refilled by a fork of this master, born with the new generation)
                logger.warning(
                    "worker %d did not take generation %d: %s; replacing it",
                    worker.pid,
                    generation,
                    err,
                )
                self._replace(worker)
                continue
            self._reload_pending.add(worker.pid)
        self._broadcast_health()
        logger.info(
            "reloading: generation %d from %s (%d listeners, %d workers)",
            generation,
            config.source,
            len(config.listeners),
            config.workers,
        )
        if not self._reload_pending:
            self._reload_applied()

    def _resize_pool(self, workers: int) -> None:
        """Add slots for new workers, or retire the workers of the slots that go away."""
        if workers > len(self._slots):
            self._slots.extend(Slot() for _ in range(workers - len(self._slots)))
            self._all_ready_announced = False  # said again once the new workers accept
        elif workers < len(self._slots):
            del self._slots[workers:]
            for worker in self._workers.values():
                if worker.slot >= workers and not worker.retiring:
                    worker.retiring = True
                    self._reload_pending.discard(worker.pid)
                    logger.info("retiring worker %d (workers: %d)", worker.pid, workers)
                    self._kill(worker, signal.SIGTERM)

    def _on_ack(self, worker: Worker, ack: control.Ack) -> None:
        if ack.generation != self._snapshot.generation or worker.pid not in self._reload_pending:
            return  # an older generation's answer
        if ack.error is not None:
            logger.error(
                "worker %d could not apply generation %d: %s; replacing it",
                worker.pid,
                ack.generation,
                ack.error,
            )
            self._reload_errors.append(ack.error)
            self._replace(worker)
        self._reload_pending.discard(worker.pid)
        if not self._reload_pending:
            self._reload_applied()

    def _replace(self, worker: Worker) -> None:
        """Drain ``worker`` away; its slot is refilled at once with the current generation."""
        if not worker.retiring:
            worker.retiring = True
            worker.restart_reason = "reload_failed"
            self._kill(worker, signal.SIGTERM)

    def _reload_applied(self) -> None:
        if self._stopping:
            return
        generation = self._snapshot.generation
        ok = not self._reload_errors
        self._count_reload(ok=ok)  # before the log line, which tests and operators wait for
        if ok:
            logger.info("generation %d applied by every worker", generation)
        status = self._status()
        if not ok:
            status += "; workers that failed to apply it were replaced"
        self._notify_ready_or_status(status)
        if self._hup_again:
            self._hup_again = False
            self._reload()

    def _count_reload(self, *, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.reload_done(ok=ok, now=time.time())

    # -- workers ------------------------------------------------------------------------------

    def _manage_workers(self) -> None:
        """Fill every empty slot whose respawn delay has passed."""
        if self._stopping:
            return
        busy = {worker.slot for worker in self._workers.values() if not worker.retiring}
        now = time.monotonic()
        for index, slot in enumerate(self._slots):
            if index not in busy and now >= slot.not_before:
                self._spawn_worker(index)

    def _spawn_worker(self, slot: int) -> None:
        channel, worker_end = control.channel_pair()
        # The health table is the first message the worker finds: queued before it exists, it
        # is read before the worker accepts anything, so a new worker never tries a server that
        # every other worker knows to be down.
        try:
            control.send_health(channel, self._health_message())
        except OSError:
            channel.close()
            worker_end.close()
            raise
        # Whatever sits in the stdio buffers would otherwise be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across the fork: a signal sent to the new child before it has put back the
        # default handlers stays pending instead of landing in the master's queue (in the child's
        # memory), and is delivered once the child unblocks.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                channel.close()
                self._run_child(worker_end)
        except OSError:
            channel.close()
            worker_end.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        worker_end.close()
        now = time.monotonic()
        worker = Worker(pid=pid, slot=slot, channel=channel, started=now, last_beat=now)
        self._workers[pid] = worker
        self._selector.register(channel, selectors.EVENT_READ, worker)
        logger.info("worker %d started", pid)

    def _run_child(self, channel: socket.socket) -> NoReturn:
        """The child's entry point: reset what belongs to the master, run the worker, ``_exit``."""
        code = EXIT_WORKER_BOOT
        try:
            self._reset_in_child()
            _ask_for_death_signal(self._pid)
            self._worker_target(
                self._config,
                self._sockets,
                self._admin_socket,
                channel.detach(),
                self._snapshot.generation,
            )
            code = EXIT_OK
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else 1)
        except BaseException:
            # Whether this was a boot failure is for the master to judge: it knows whether a
            # heartbeat byte was ever sent.
            logger.exception("worker %d failed", os.getpid())
            code = EXIT_WORKER_BOOT
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _reset_in_child(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # A terminal (Ctrl-C, hangup) or a "kill -<sig> -<pgid>" signals the whole process group.
        # INT, HUP and USR1 are requests to the master, which turns them into what the workers
        # must do; their default action (terminate) would kill every worker at once. The worker
        # may install its own handlers for them.
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        self._signal_queue.clear()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        for sibling in self._workers.values():
            if sibling.channel is not None:
                sibling.channel.close()
        self._checker.close_in_child()
        # The epoll descriptor belongs to the master; closing it unregisters nothing there.
        self._selector.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _wait_for_events(self, timeout: float) -> None:
        """Sleep until a signal, a control message or ``timeout``; handle the messages."""
        for key, events in self._selector.select(timeout):
            if key.fd == self._wakeup_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wakeup_r, WAKEUP_READ_BYTES):
                        pass
            elif isinstance(key.data, Probe):
                for change in self._checker.on_event(key.data, events, time.monotonic()):
                    self._on_health_change(change)
            else:
                worker: Worker = key.data
                self._read_channel(worker)

    def _read_channel(self, worker: Worker) -> None:
        """Every message waiting from ``worker``: heartbeats and acknowledgements."""
        while worker.channel is not None:
            try:
                message = control.receive(worker.channel)
            except BlockingIOError:
                return
            except (OSError, control.ControlError) as err:
                logger.warning("worker %d: control channel failed: %s", worker.pid, err)
                message = None
            if message is None:
                # The worker closed its end (it is exiting); stop polling what stays readable.
                self._close_channel(worker)
                return
            if isinstance(message, control.Ack):
                self._on_ack(worker, message)
            elif isinstance(message, bytes):
                self._on_heartbeat(worker)
            elif isinstance(message, control.ServerDown):
                self._on_server_down(worker, message)

    # -- upstream health ----------------------------------------------------------------------

    def _health_timeout(self, timeout: float) -> float:
        """``timeout``, or less when a health check or a passive mark is due sooner."""
        due = self._checker.next_wakeup()
        if due is None or self._stopping:
            return timeout
        return max(0.0, min(timeout, due - time.monotonic()))

    def _run_health(self) -> None:
        """Start due checks, time out late ones, lift expired passive marks; broadcast changes."""
        now = time.monotonic()
        for change in self._health.expire(now) + self._checker.tick(now):
            self._on_health_change(change)
        behind = [w for w in self._workers.values() if w.health_behind]
        if behind:
            self._send_health(behind)

    def _on_server_down(self, worker: Worker, report: control.ServerDown) -> None:
        change = self._health.passive_failure(
            report.upstream, report.server, report.reason, time.monotonic()
        )
        if change is not None:
            self._on_health_change(change)
        else:
            # the worker marked it down on its own: it gets the table, which confirms or undoes
            self._send_health([worker])

    def _on_health_change(self, change: Change) -> None:
        self._log_change(change)
        self._broadcast_health()

    @staticmethod
    def _log_change(change: Change) -> None:
        extra = {"upstream": change.upstream}
        if change.up:
            logger.info(
                "upstream %s server %s is up: %s",
                change.upstream,
                change.server,
                change.reason,
                extra=extra,
            )
        else:
            logger.warning(
                "upstream %s server %s is down: %s",
                change.upstream,
                change.server,
                change.reason,
                extra=extra,
            )

    def _health_message(self) -> bytes:
        return control.encode_health(
            control.Health(self._snapshot.generation, self._health.table())
        )

    def _broadcast_health(self) -> None:
        self._send_health(list(self._workers.values()))

    def _send_health(self, workers: list[Worker]) -> None:
        body = self._health_message()
        for worker in workers:
            if worker.channel is None or worker.retiring:
                continue
            try:
                control.send_health(worker.channel, body)
            except BlockingIOError:
                worker.health_behind = True  # the whole table goes again on the next pass
                continue
            except OSError:
                continue  # the worker is exiting; reaping follows
            worker.health_behind = False

    def _on_heartbeat(self, worker: Worker) -> None:
        worker.last_beat = time.monotonic()
        if not worker.ready:
            worker.ready = True
            if not self._all_ready_announced and self._all_ready():
                self._all_ready_announced = True
                logger.info("all %d workers ready", len(self._workers))
                self._notify_ready()

    def _all_ready(self) -> bool:
        serving = [worker for worker in self._workers.values() if not worker.retiring]
        return len(serving) == self._config.workers and all(w.ready for w in serving)

    def _notify_ready(self) -> None:
        """Every worker is accepting: systemd ``READY=1``."""
        systemd.notify_ready(self._status())

    def _notify_ready_or_status(self, status: str) -> None:
        """``READY=1`` ends a reload; during start-up it waits for every worker to accept."""
        if self._all_ready_announced:
            systemd.notify_ready(status)
        else:
            systemd.notify_status(status)

    def _status(self) -> str:
        """What the master does, for systemd's ``STATUS=`` (``systemctl status``)."""
        listeners = len(self._config.listeners)
        return (
            f"{listeners} listener{'s' if listeners != 1 else ''}, "
            f"{self._config.workers} worker{'s' if self._config.workers != 1 else ''}, "
            f"generation {self._snapshot.generation}"
        )

    def _feed_watchdog(self) -> None:
        """``WATCHDOG=1`` every half interval, and only while every worker's loop beats."""
        interval = self._watchdog_s
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog < interval / 2:
            return
        serving = [w for w in self._workers.values() if not w.retiring]
        if len(serving) < self._config.workers or any(
            now - w.last_beat > WATCHDOG_FRESH_S for w in serving
        ):
            return  # systemd restarts the service if this lasts WatchdogSec
        self._last_watchdog = now
        systemd.notify_watchdog()

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel is not None:
            self._selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None

    def _forget(self, worker: Worker) -> None:
        # Messages sent just before the exit still count: they decide boot failure or crash.
        self._read_channel(worker)
        self._close_channel(worker)
        del self._workers[worker.pid]
        if worker.pid in self._reload_pending:
            self._reload_pending.discard(worker.pid)  # its replacement is born with it
            if not self._reload_pending:
                self._reload_applied()

    def _reap_workers(self) -> None:
        """Collect every exited child; judge each worker's exit."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.get(pid)
            if worker is None:
                logger.info("child %d (not a worker) %s", pid, describe_exit(status))
                continue
            self._forget(worker)
            self._mark_dead(pid)
            self._judge_exit(worker, status)

    def _judge_exit(self, worker: Worker, status: int) -> None:
        cause = describe_exit(status)
        if self._stopping or worker.retiring:
            logger.info("worker %d stopped: %s", worker.pid, cause)
            if worker.restart_reason and not self._stopping:
                self._count_restart(worker.restart_reason)
            return
        if not worker.ready and os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_WORKER_BOOT:
            raise HaltServer(f"worker {worker.pid} failed to boot", EXIT_WORKER_BOOT)
        if worker.aborted_at is not None:
            missed = f"{self._config.heartbeat_timeout_s:.0f} s"
            if os.WIFSIGNALED(status):
                # the master's own SIGABRT or SIGKILL: say so, not describe_exit's guess at OOM
                sent = _name(os.WTERMSIG(status))
                cause = f"killed for a missed heartbeat (none for {missed}; {sent} from the master)"
            else:
                cause += f" after missing its heartbeat for {missed}"
        self._count_restart("heartbeat" if worker.aborted_at is not None else "crash")
        now = time.monotonic()
        slot = self._slots[worker.slot]
        if now - worker.started >= RESPAWN_STABLE_S:
            slot.crashes.clear()
            slot.backoff_s = 0.0
        while slot.crashes and now - slot.crashes[0] > RESPAWN_WINDOW_S:
            slot.crashes.popleft()
        slot.crashes.append(now)
        if slot.backoff_s > 0 or len(slot.crashes) > RESPAWN_BURST:
            slot.backoff_s = min(
                RESPAWN_BACKOFF_MAX_S, max(RESPAWN_BACKOFF_START_S, slot.backoff_s * 2)
            )
            slot.not_before = now + slot.backoff_s
            logger.warning(
                "worker %d %s; slot %d is crash-looping, respawning in %.0f s",
                worker.pid,
                cause,
                worker.slot,
                slot.backoff_s,
            )
        else:
            slot.not_before = now
            logger.warning("worker %d %s; respawning", worker.pid, cause)

    def _murder_workers(self) -> None:
        """SIGABRT a worker whose heartbeat is stale; SIGKILL it if SIGABRT did not end it."""
        now = time.monotonic()
        timeout = self._config.heartbeat_timeout_s
        for worker in self._workers.values():
            if worker.aborted_at is None:
                if now - worker.last_beat > timeout:
                    logger.warning(
                        "worker %d sent no heartbeat for %.0f s; sending SIGABRT",
                        worker.pid,
                        now - worker.last_beat,
                    )
                    worker.aborted_at = now
                    self._kill(worker, signal.SIGABRT)
            elif not worker.killed and now - worker.aborted_at > KILL_AFTER_ABORT_S:
                logger.warning("worker %d survived SIGABRT; sending SIGKILL", worker.pid)
                self._kill(worker, signal.SIGKILL)

    def _signal_workers(self, signum: int) -> None:
        for worker in self._workers.values():
            self._kill(worker, signum)

    def _kill(self, worker: Worker, signum: int) -> None:
        if worker.killed:
            return
        if signum == signal.SIGKILL:
            worker.killed = True
        # Exited but not reaped yet: the pid is still ours, so this cannot hit another process.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def _count_restart(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.worker_restarted(reason)

    @staticmethod
    def _mark_dead(pid: int) -> None:
        metrics.mark_process_dead(pid)

    # -- sockets ------------------------------------------------------------------------------

    def _bind_all(self) -> None:
        """Take the sockets socket activation passed (by name), bind the others."""
        passed = systemd.listen_fds()
        activation = systemd.match_listeners(
            passed, self._config.listeners, self._config.admin is not None
        )
        for name, listener in self._config.listeners.items():
            sock = activation.listeners.get(name)
            how = "socket from systemd"
            if sock is None:
                sock = bind_listener(f"listeners.{name}", listener.bind)
                how = "bound"
            self._sockets[name] = sock
            logger.info(
                "listening on %s (listener %s, policy %s, %s)",
                _sockname(sock),
                name,
                listener.policy,
                how,
                extra={"listener": name},
            )
        if activation.admin is not None:
            self._admin_socket = activation.admin
            logger.info("admin listening on %s (socket from systemd)", _sockname(activation.admin))
        elif self._config.admin is not None:
            self._admin_socket = bind_listener("admin", self._config.admin.bind)
            logger.info("admin listening on %s", _sockname(self._admin_socket))

    def _close_sockets(self) -> None:
        """Close the master's copies of the listening sockets (the workers keep theirs)."""
        for sock in self._sockets.values():
            sock.close()
        if self._admin_socket is not None:
            self._admin_socket.close()


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))
