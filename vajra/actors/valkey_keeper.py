"""The embedded Valkey of ``vajra up``, kept running: started, restarted, stopped last.

It runs in its own session (a terminal's Ctrl-C does not stop it before the ledger's last
flush), is restarted on the same port and data directory when it dies, and is recorded in
``run/valkey.pid``. Valkey cannot watch the supervisor's lifeline pipe, so a small reaper
process does it for Valkey: after a ``kill -9`` of the supervisor it waits for the actors to
exit (the home lock) and then stops Valkey (:func:`vajra.state.reaper.reap_after_parent`);
the next ``vajra up`` also stops a recorded server it finds still running.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import trio

from vajra.actors.home import StartupError
from vajra.state import EmbeddedValkey, redact_url
from vajra.state.reaper import reaper_command, record_server, stop_recorded_server

log = logging.getLogger("vajra.supervisor")

VALKEY_PID_FILE = "valkey.pid"
_VALKEY_START_S = 60.0
_VALKEY_STOP_S = 5.0
_MIN_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0


def free_port() -> int:
    """A TCP port on loopback the OS considers free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ValkeyKeeper:
    """Runs the embedded Valkey of the cluster in ``home``; see the module docstring.

    ``lifeline_fd`` is the read end of the supervisor's lifeline pipe (passed to the reaper);
    ``lock_path`` the home lock the reaper waits for.
    """

    def __init__(self, home: Path, run_dir: Path, *, lifeline_fd: int, lock_path: Path) -> None:
        self.valkey = EmbeddedValkey(home / "valkey")
        self.pid_file = run_dir / VALKEY_PID_FILE
        self._lifeline_fd = lifeline_fd
        self._lock_path = lock_path
        self._process: trio.Process | None = None
        self._stopping = False
        self._reaper: trio.Process | None = None

    async def run(self, *, task_status: trio.TaskStatus[str]) -> None:
        """Run the embedded Valkey: report its URL once it answers, restart it when it dies.

        Restarts use the same port and data directory (so every client's URL stays valid and
        the append-only file is replayed), with backoff. A first start that fails is retried
        on a new port (another process may have taken the one picked), then StartupError.
        """
        valkey = self.valkey
        pid_file = self.pid_file
        # We hold the home lock, so a server recorded there was left by a dead supervisor.
        await trio.to_thread.run_sync(stop_recorded_server, pid_file)
        await trio.to_thread.run_sync(lambda: valkey.password)  # create it once, 0600
        await self._start_reaper()
        port: int | None = None
        failed_starts = 0
        backoff = _MIN_BACKOFF_S
        while True:
            try_port = port if port is not None else free_port()
            process = await self._spawn(valkey, try_port)
            if not await self._ready(valkey, process, try_port, first=port is None):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                if port is None:
                    failed_starts += 1
                    if failed_starts >= 3:
                        raise StartupError(
                            f"the embedded Valkey did not start; see {valkey.log_path}"
                        )
                    continue
                log.warning("embedded valkey did not come back; retrying in %.2fs", backoff)
            else:
                if port is None:
                    port = try_port
                    log.info("embedded valkey at %s", redact_url(valkey.url_for(port)))
                    task_status.started(valkey.url_for(port))
                else:
                    log.warning("embedded valkey restarted on port %d", port)
                up_since = trio.current_time()
                await process.wait()
                if self._stopping:
                    return
                if trio.current_time() - up_since > 30:
                    backoff = _MIN_BACKOFF_S
                log.warning(
                    "embedded valkey exited with %s; restarting on port %d in %.2fs",
                    process.returncode,
                    port,
                    backoff,
                )
            await trio.sleep(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)

    async def _spawn(self, valkey: EmbeddedValkey, port: int) -> trio.Process:
        argv = await trio.to_thread.run_sync(valkey.command, port)
        log_fd = _open_append(valkey.log_path)
        try:
            # Own session: Ctrl-C must not stop it before the ledger's last flush.
            process = await trio.lowlevel.open_process(
                argv,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=str(valkey.data_dir),
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        self._process = process
        record_server(
            self.pid_file, process.pid, config_path=valkey.config_path, owner_pid=os.getpid()
        )
        return process

    async def _ready(
        self, valkey: EmbeddedValkey, process: trio.Process, port: int, *, first: bool
    ) -> bool:
        """Wait for an authenticated PING. A restart may take long (replaying a large
        append-only file): it is waited for as long as the process lives."""
        deadline = trio.current_time() + _VALKEY_START_S
        while process.returncode is None:
            if await trio.to_thread.run_sync(lambda: valkey.ping(port, timeout_s=0.5)):
                return True
            if first and trio.current_time() >= deadline:
                return False
            await trio.sleep(0.05)
        return False

    async def _start_reaper(self) -> None:
        argv = reaper_command(
            lifeline_fd=self._lifeline_fd,
            lock_path=self._lock_path,
            pid_file=self.pid_file,
            owner_pid=os.getpid(),
        )
        self._reaper = await trio.lowlevel.open_process(
            argv, start_new_session=True, pass_fds=(self._lifeline_fd,)
        )

    async def stop(self) -> None:
        """Stop the embedded Valkey (after the actors): SIGTERM, so it fsyncs its AOF."""
        self._stopping = True
        process = self._process
        if process is not None:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(_VALKEY_STOP_S):
                    await process.wait()
                if process.returncode is None:
                    log.warning("embedded valkey did not stop in time; killing it")
                    process.kill()
                    await process.wait()
            log.info("stopped embedded valkey")
        self.pid_file.unlink(missing_ok=True)

    async def wait_reaper(self) -> None:
        """The reaper sees the lifeline close, finds no pid file, and exits."""
        reaper = self._reaper
        if reaper is None:
            return
        with trio.move_on_after(3.0):
            await reaper.wait()
        if reaper.returncode is None:
            reaper.kill()
            await reaper.wait()


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
