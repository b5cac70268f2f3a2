"""Client side of the ``dsdseg`` worker: start it as a separate process, read its JSON progress lines,
cancel the whole process tree. Qt-free and MRML-free, so the Slicer module and tests share it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

EXIT_MESSAGES = {
    2: "bad input or configuration",
    3: "out of memory",
    130: "cancelled",
}


@dataclass
class WorkerResult:
    """How a worker run ended: ``ok``, ``cancelled``, or ``error`` with a readable message."""

    status: str
    exit_code: int | None
    message: str
    records: list[dict[str, Any]]
    kind: str = ""  # for errors: "error" (bad input), "out of memory", "crash", ...

    def raise_for_status(self, what: str = "the run") -> None:
        """Bad input → InputError (its message names the problem); any other failure → :class:`WorkerError`."""
        if self.ok:
            return
        if self.status == "cancelled":
            from ..engine.errors import Cancelled

            raise Cancelled(f"{what} was cancelled")
        if self.exit_code == 2 or self.kind == "error":
            from ..engine.errors import InputError

            raise InputError(f"{what} failed: {self.message}")
        raise WorkerError(f"{what} failed: {self.message}", self.kind or EXIT_MESSAGES.get(self.exit_code or 1, "crash"),
                          self.exit_code)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def out_of_memory(self) -> bool:
        return self.status == "error" and ran_out_of_memory(self.kind, self.exit_code)


def worker_command(python: str | None, args: Sequence[str]) -> list[str]:
    """The command line that runs ``dsdseg ARGS`` with the given Python (Slicer: its PythonSlicer)."""
    return [python or sys.executable, "-m", "DSDSegmentationLib.worker.cli", *[str(a) for a in args]]


def popen_platform_options(platform: str | None = None) -> dict[str, Any]:
    """Popen options per platform. POSIX: a new session, so cancel can end the worker's whole process group.
    Windows: a new process group and no console window (CREATE_NO_WINDOW and a hidden STARTUPINFO), so a worker
    started from Slicer never flashes a black console."""
    platform = platform or os.name
    if platform != "nt":
        return {"start_new_session": True}
    create_new_process_group, create_no_window = 0x00000200, 0x08000000  # the values of subprocess's constants
    options: dict[str, Any] = {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", create_new_process_group)
                               | getattr(subprocess, "CREATE_NO_WINDOW", create_no_window)}
    if hasattr(subprocess, "STARTUPINFO"):
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        options["startupinfo"] = info
    return options


class WorkerProcess:
    """A running ``dsdseg`` command with ``--progress json``.

    ``poll()`` returns the progress records that arrived since the last call without blocking (a GUI calls it
    from a timer); ``cancel()`` ends the process and its children; ``wait()`` blocks until the end.
    """

    def __init__(self, args: Sequence[str], python: str | None = None, env: dict[str, str] | None = None,
                 cwd: str | None = None, interactive: bool = False):
        if not interactive and "--progress" not in args:
            args = [*args, "--progress", "json"]
        self.command = worker_command(python, args)
        self.records: list[dict[str, Any]] = []
        self._queue: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._cancelled = False
        # UTF-8 both ways, whatever the system's code page (Windows: cp1252, cp932, ...): the worker writes its
        # streams in UTF-8 (PYTHONIOENCODING) and they are read as UTF-8; a byte that is not (a library printing in
        # another encoding) becomes U+FFFD instead of ending the reader thread, which would leave the panel waiting
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            errors="replace", bufsize=1, stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}, cwd=cwd, **popen_platform_options())
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = {"stage": "log", "done": 0, "total": 0, "message": line}
            self._queue.put(rec)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-200]

    def send(self, request: dict[str, Any]) -> None:
        """Write one JSON request line (interactive workers only)."""
        if self.proc.stdin is None:
            raise RuntimeError("this worker was not started with interactive=True")
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def poll(self) -> list[dict[str, Any]]:
        new = []
        while True:
            try:
                new.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.records += new
        return new

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def cancel(self, grace: float = 3.0) -> None:
        """Terminate the worker and everything it started (its process group); kill after ``grace`` seconds."""
        if not self.running:
            return
        self._cancelled = True
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True)
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            if os.name != "nt":
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()

    def wait(self, timeout: float | None = None) -> WorkerResult:
        deadline = None if timeout is None else time.time() + timeout
        while self.running:
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"worker still running after {timeout} s: {' '.join(self.command)}")
            time.sleep(0.02)
        for t in self._threads:
            t.join(timeout=5)
        self.poll()
        return self.result()

    def result(self) -> WorkerResult:
        code = self.proc.returncode
        if self._cancelled:
            return WorkerResult("cancelled", code, "cancelled by the user", self.records)
        if code == 0:
            return WorkerResult("ok", 0, "", self.records)
        errors = [r for r in self.records if r.get("stage") == "error"]
        if errors:
            kind = errors[-1].get("kind", "error")
            msg = f"{kind}: {errors[-1].get('message', '')}"
        else:
            kind = "out of memory" if code == 3 else "error" if code == 2 else "crash"
            tail = "\n".join(self._stderr[-15:])
            msg = f"the worker {ended_how(code)}" + (f":\n{tail}" if tail else "")
        return WorkerResult("error", code, msg, self.records, kind=kind)


def ran_out_of_memory(kind: str | None, code: int | None) -> bool:
    """The worker's run ended for lack of memory: it said so, or it was killed as the kernel kills for that."""
    return kind == "out of memory" or code == 3 or (code is not None and code == -getattr(signal, "SIGKILL", 9))


def ended_how(code: int | None) -> str:
    """How a worker process that wrote no error record ended, in words: its exit code, or the signal that ended it.
    On Linux the kernel's out-of-memory killer ends a process with SIGKILL and nothing on its streams, so that one
    is named as the likely cause."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == getattr(signal, "SIGKILL", 9):
            return (f"was killed by the system ({name}), most often because the computer ran out of memory (on Linux "
                    "the kernel's out-of-memory killer)")
        return f"was ended by {name}"
    return f"crashed (exit code {code}, {EXIT_MESSAGES.get(code, 'unexpected error') if code is not None else 'unknown'})"


class WorkerError(Exception):
    """The worker failed for a reason other than the input: out of memory, a crash, an unexpected end.

    ``kind`` is the worker's word for it ("out of memory", "crash", ...) and ``exit_code`` what the one-shot
    command returns (negative: the signal that ended it); ``out_of_memory`` says that memory ran out, or most
    likely did (a SIGKILL from the kernel's out-of-memory killer), so that a panel can say what to do."""

    def __init__(self, message: str, kind: str = "crash", exit_code: int | None = None):
        super().__init__(message)
        self.kind, self.exit_code = kind, exit_code

    @property
    def out_of_memory(self) -> bool:
        return ran_out_of_memory(self.kind, self.exit_code)


class ServeWorker:
    """A warm ``dsdseg serve`` process: the model stays loaded between requests.

    ``submit(request)`` returns a :class:`ServeJob` with the same interface as :class:`WorkerProcess`
    (``running``, ``poll``, ``wait``, ``cancel``, ``result``). Cancelling a job asks the worker to stop that one
    request (between two sliding-window batches, or before it starts); the worker, its loaded model and every
    other request go on. Only a worker that does not answer a cancel within ``cancel_timeout`` seconds is ended.
    """

    cancel_timeout = 15.0

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None):
        self.python, self.env = python, env
        self.proc: WorkerProcess | None = None
        self.environment: str | None = None  # from the worker's "ready" record: torch, CUDA build, device
        self._next_id = 0
        self._jobs: dict[int, "ServeJob"] = {}
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.running

    def _ensure(self) -> WorkerProcess:
        if not self.alive:
            self.proc = WorkerProcess(["serve"], python=self.python, env=self.env, interactive=True)
        return self.proc  # type: ignore[return-value]

    def submit(self, request: dict[str, Any]) -> "ServeJob":
        worker = self._ensure()
        with self._lock:
            self._next_id += 1
            rid = self._next_id
        job = ServeJob(self, worker, rid)
        self._jobs[rid] = job
        worker.send({**request, "id": rid})
        return job

    def dispatch(self, worker: "WorkerProcess") -> None:
        for rec in worker.poll():
            if rec.get("stage") == "ready" and rec.get("environment"):
                self.environment = str(rec["environment"])
            job = self._jobs.get(rec.get("id"))
            if job is not None:
                job.records.append(rec)
                job._pending.append(rec)
                if rec.get("stage") in ("done", "error", "cancelled"):
                    job._final = rec

    def stop(self) -> None:
        if self.proc is not None and self.proc.running:
            try:
                self.proc.send({"command": "quit"})
                self.proc.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - fall back to killing it
                self.proc.cancel()
        self.proc = None


class ServeJob:
    """One request to a :class:`ServeWorker`."""

    def __init__(self, server: ServeWorker, worker: WorkerProcess, rid: int):
        self.server, self.worker, self.id = server, worker, rid
        self.records: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._final: dict[str, Any] | None = None
        self._cancelled = False

    @property
    def running(self) -> bool:
        self.server.dispatch(self.worker)
        return self._final is None and not self._cancelled and self.worker.running

    def poll(self) -> list[dict[str, Any]]:
        self.server.dispatch(self.worker)
        new, self._pending = self._pending, []
        return new

    def cancel(self) -> None:
        """Ask the worker to stop this request only; returns at once (``wait`` waits for the worker's answer)."""
        if self._final is None and not self._cancelled and self.worker.running:
            self._cancelled = True
            try:
                self.worker.send({"command": "cancel", "target": self.id})
            except (OSError, ValueError):  # the worker is gone: nothing left to stop
                pass

    @property
    def _active(self) -> bool:
        self.server.dispatch(self.worker)
        return self._final is None and self.worker.running

    def wait(self, timeout: float | None = None) -> WorkerResult:
        deadline = None if timeout is None else time.time() + timeout
        if self._cancelled:  # wait for the worker to confirm; one that does not answer is ended
            limit = time.time() + self.server.cancel_timeout
            while self._active:
                if time.time() > limit:
                    self.worker.cancel()
                    break
                time.sleep(0.01)
            return self.result()
        while self.running:
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
            time.sleep(0.01)
        return self.result()

    def result(self) -> WorkerResult:
        if self._cancelled:
            return WorkerResult("cancelled", None, "cancelled by the user", self.records)
        if self._final is None:
            self.worker.wait()
            code = self.worker.proc.returncode
            tail = "\n".join(self.worker._stderr[-15:])
            return WorkerResult("error", code, f"the warm worker {ended_how(code)}" + (f":\n{tail}" if tail else ""),
                                self.records, kind="crash")
        if self._final["stage"] == "done":
            return WorkerResult("ok", 0, "", self.records)
        if self._final["stage"] == "cancelled":
            return WorkerResult("cancelled", self._final.get("exit_code"), "cancelled by the user", self.records)
        return WorkerResult("error", self._final.get("exit_code"), f"{self._final.get('kind')}: {self._final.get('message')}",
                            self.records, kind=self._final.get("kind", "error"))
