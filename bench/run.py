"""`make bench`: the benchmark of issue 5 in one command.

Starts every server it measures (each on a free port, with a fresh temporary
data directory), drives the load with wrk, and prints a Markdown table in
which each figure is the median of BENCH_ROUNDS runs and each ratio is the
median of the ratios measured within one round (both sides of a ratio always
come from the same round). The table is also written to
bench/results/latest.md.

Parts (BENCH_ONLY=append,length,read,startup,memory runs a subset):

- append:  64 connections appending ~300-byte messages over 64 sessions to the
           framework ceiling (bench/ceiling_app.py), chatsessions with
           fsync=always and fsync=never, the naive design (bench/naive_app.py)
           from empty sessions and from sessions of ~1,000 messages, and the
           PostgreSQL store when a database answers;
- length:  the same load on ONE session that holds 10, 10,000 or 100,000 messages;
- read:    the last 50 messages (order=desc&limit=50) of a 100,000-message
           session against those of a 10-message session;
- startup: process start until /healthz answers, 100,000 sessions on disk;
- memory:  resident memory with 10,000 sessions x 100 messages on disk, after
           reading 1,000 and then all 10,000 of them.

Environment: BENCH_SECONDS (seconds per wrk run, default 10), BENCH_WARMUP
(default 1), BENCH_ROUNDS (default 3), BENCH_CONNECTIONS (64), BENCH_SESSIONS
(64), BENCH_WRK_THREADS (1: wrk needs little CPU and the server gets the other
core), BENCH_ONLY, CHATSESSIONS_BENCH_POSTGRES_DSN (default
postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from chatsessions.config import FsyncMode, Settings
from chatsessions.models import DEFAULT_TENANT, MessageCreate, Role, SessionCreate
from chatsessions.storage.file import FileSessionRepository
from chatsessions.storage.vfs import FileSystem

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "latest.md"
PARTS = ("append", "length", "read", "startup", "memory")
CONTENT = "The quick brown fox jumps over the lazy dog. " * 5  # the same text as append.lua
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _env_int(name: str, default: int) -> int:
    return max(1, int(os.environ.get(name, default)))


@dataclass(frozen=True)
class Config:
    seconds: int = field(default_factory=lambda: _env_int("BENCH_SECONDS", 10))
    warmup: int = field(default_factory=lambda: int(os.environ.get("BENCH_WARMUP", 1)))
    rounds: int = field(default_factory=lambda: _env_int("BENCH_ROUNDS", 3))
    connections: int = field(default_factory=lambda: _env_int("BENCH_CONNECTIONS", 64))
    sessions: int = field(default_factory=lambda: _env_int("BENCH_SESSIONS", 64))
    threads: int = field(default_factory=lambda: _env_int("BENCH_WRK_THREADS", 1))
    parts: tuple[str, ...] = field(
        default_factory=lambda: tuple(p for p in os.environ.get("BENCH_ONLY", ",".join(PARTS)).split(",") if p)
    )
    postgres_dsn: str = field(
        default_factory=lambda: os.environ.get("CHATSESSIONS_BENCH_POSTGRES_DSN", DEFAULT_POSTGRES_DSN)
    )


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- servers --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without CHATSESSIONS_* (a keys file there would answer 401s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSIONS_")}
    env.update(extra)
    return env


@dataclass(frozen=True)
class Launch:
    """What to start: a bench app (`app`, served by uvicorn) or `chatsessions serve` on `data_dir`."""

    app: str | None = None
    data_dir: Path | None = None
    fsync: str = "always"
    log_level: str = "warning"
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        if self.app is not None:  # the same server settings as `chatsessions serve`
            return [
                sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH_DIR), self.app,
                "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", self.log_level,
            ]  # fmt: skip
        return [
            sys.executable, "-m", "chatsessions.cli", "serve", "--port", str(port),
            "--data-dir", str(self.data_dir), "--fsync", self.fsync, "--log-level", self.log_level,
        ]  # fmt: skip


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_in: float = 0.0  # seconds from process start until /healthz answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextmanager
def serve(launch: Launch, *, log_dir: Path) -> Iterator[Server]:
    """Start a server on a free port; yield it once /healthz answers; stop it (SIGTERM) after."""
    port = free_port()
    log_path = log_dir / f"server-{port}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log_file:
        started = time.perf_counter()
        env = _clean_env(launch.env)
        proc = subprocess.Popen(launch.command(port), env=env, stdout=log_file, stderr=subprocess.STDOUT)
        server = Server(proc, port, log_path)
        try:
            while not _healthy(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
                if time.perf_counter() - started > 120:
                    raise RuntimeError(f"server did not answer /healthz in 120 s:\n{server.log_tail()}")
                time.sleep(0.005)
            server.started_in = time.perf_counter() - started
            try:
                yield server
            except BaseException:
                say(f"the server on port {port} (exit code {proc.poll()}) logged, last lines:\n{server.log_tail()}")
                raise
        finally:
            server.stop()


# --- load -----------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # server CPU time (all threads) per request

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def check_wrk() -> None:
    if shutil.which("wrk") is None:
        print(
            "bench: wrk is not installed. It generates the load (C, so it leaves the server's core alone).\n"
            "  Debian/Ubuntu: sudo apt-get install -y wrk   (as root: apt-get update && apt-get install -y wrk)\n"
            "  macOS: brew install wrk",
            file=sys.stderr,
        )
        sys.exit(2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wrk(
    url: str, script: str, *args: str, seconds: int, connections: int, threads: int, pid: int | None = None
) -> Load:
    cpu_before = cpu_seconds(pid) if pid else 0.0
    command = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(BENCH_DIR / script), url, "--", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu = cpu_seconds(pid) - cpu_before if pid else None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data: dict[str, int] = json.loads(line[len("BENCH ") :])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    if errors:
        say(f"  WARNING: {errors} errors in this run: {data}")
    requests = data["requests"]
    cpu_us = cpu * 1e6 / requests if cpu is not None and requests else None
    return Load(requests, data["duration_us"] / 1e6, errors, data["p50_us"] / 1e3, data["p99_us"] / 1e3, cpu_us)


def put_sessions(base_url: str, ids: list[str]) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for session_id in ids:
            answer = client.put(f"/v1/sessions/{session_id}", json={})
            if answer.status_code not in (200, 201):
                raise RuntimeError(f"PUT {session_id}: {answer.status_code} {answer.text[:200]}")


def append_some(base_url: str, session_id: str, count: int) -> None:
    """A few sequential appends: warms a server up without growing a session much."""
    body = {"role": "user", "content": CONTENT, "metadata": {"client": "wrk", "lang": "en"}}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(count):
            answer = client.post(f"/v1/sessions/{session_id}/messages", json=body)
            if answer.status_code != 201:
                raise RuntimeError(f"append to {session_id}: {answer.status_code} {answer.text[:200]}")


def timed_get(base_url: str, path: str) -> float:
    """Milliseconds for one GET on a fresh connection (that must answer 200)."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        started = time.perf_counter()
        answer = client.get(path)
        elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"GET {path}: {answer.status_code} {answer.text[:200]}")
    return elapsed * 1e3


# --- building data directories in-process ---------------------------------


class UnsyncedFileSystem(FileSystem):
    """For building throwaway bench data only: skips fsync, which would make
    writing 100,000 session logs take minutes on a real disk."""

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: Path) -> None:
        pass


def bench_message() -> MessageCreate:
    return MessageCreate(role=Role.user, content=CONTENT, metadata={"client": "prefill", "lang": "en"})


async def _fill(data_dir: Path, sessions: list[tuple[str, int]], *, per_append: int, parallel: int = 512) -> None:
    settings = Settings(data_dir=data_dir, fsync=FsyncMode.never)
    repo = await FileSessionRepository.open(settings, fs=UnsyncedFileSystem())
    batch = [bench_message()] * per_append
    gate = asyncio.Semaphore(parallel)

    async def fill_one(session_id: str, count: int) -> None:
        async with gate:
            await repo.create_session(
                DEFAULT_TENANT, SessionCreate(id=session_id, user_id="bench-user", title=f"bench {session_id}")
            )
            for start in range(0, count, per_append):
                await repo.append_messages(DEFAULT_TENANT, session_id, batch[: min(per_append, count - start)])

    try:
        await asyncio.gather(*(fill_one(session_id, count) for session_id, count in sessions))
    finally:
        await repo.aclose()


def build_file_store(data_dir: Path, sessions: list[tuple[str, int]], *, per_append: int = 100) -> Path:
    """A chatsessions data directory holding `sessions` (id, message count), written in-process,
    `per_append` messages per append (so per log record)."""
    started = time.perf_counter()
    asyncio.run(_fill(data_dir, sessions, per_append=per_append))
    # Flush it all now: on ext4 an fsync waits for other files' dirty data, so pages
    # left dirty here would slow the fsyncs of the next measurement.
    os.sync()
    total = sum(count for _, count in sessions)
    elapsed = time.perf_counter() - started
    say(f"  built {data_dir.name}: {len(sessions):,} sessions, {total:,} messages in {elapsed:.1f} s")
    return data_dir


def build_naive_store(data_dir: Path, ids: list[str], messages: int) -> Path:
    """The naive app's files: one whole-session JSON per session."""
    data_dir.mkdir(parents=True)
    now = datetime.now(UTC).isoformat()
    for session_id in ids:
        history = [
            {"seq": seq, "role": "user", "content": CONTENT, "metadata": {"client": "prefill"}, "references": None}
            | {"created_at": now}
            for seq in range(1, messages + 1)
        ]
        session = {"id": session_id, "created_at": now, "updated_at": now, "messages": history}
        (data_dir / f"{session_id}.json").write_text(json.dumps(session))
    os.sync()  # see build_file_store
    return data_dir


# --- results --------------------------------------------------------------


@dataclass
class Row:
    part: str
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    ratio_name: str = ""
    ratios: list[float] = field(default_factory=list)
    target: str = ""
    passes: Callable[[float], bool] | None = None
    errors: int = 0
    note: str = ""
    cpu_us: list[float] = field(default_factory=list)

    def cpu(self) -> str:
        return f"{statistics.median(self.cpu_us):,.0f} µs" if self.cpu_us else ""

    def figure(self) -> str:
        if not self.values:
            return "—"
        value = statistics.median(self.values)
        text = f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"
        return f"{text} {self.unit}" + (f" ({self.errors} errors!)" if self.errors else "")

    def ratio(self) -> str:
        if not self.ratios:
            return ""
        return f"{self.ratio_name} = {statistics.median(self.ratios):.2f}"

    def verdict(self) -> str:
        if self.passes is None or not (self.ratios or self.values):
            return ""
        value = statistics.median(self.ratios) if self.ratios else statistics.median(self.values)
        return "met" if self.passes(value) else "**missed**"


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def row(self, key: str, part: str, name: str, unit: str, **kwargs: Any) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(part, name, unit, **kwargs)
        return self.rows[key]

    def value(self, key: str) -> float | None:
        row = self.rows.get(key)
        return statistics.median(row.values) if row and row.values else None

    def table(self) -> str:
        lines = [
            "| part | measurement | figure (median) | server CPU per request | ratio (median of per-round ratios) "
            "| target | |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows.values():
            name = row.name + (f" — {row.note}" if row.note else "")
            cells = [row.part, name, row.figure(), row.cpu(), row.ratio(), row.target, row.verdict()]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout.split()
    return (
        f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, wrk {wrk_version[1] if len(wrk_version) > 1 else '?'}"
    )


# --- the parts ------------------------------------------------------------


class Bench:
    def __init__(self, config: Config, root: Path) -> None:
        self.config = config
        self.root = root
        self.results = Results()
        self.logs = root / "logs"
        self.logs.mkdir()
        self.load_averages: list[float] = []

    def serve(self, launch: Launch) -> AbstractContextManager[Server]:
        return serve(launch, log_dir=self.logs)

    def fresh_dir(self, name: str) -> Path:
        return self.root / f"{name}-{uuid.uuid4().hex[:8]}"

    def load(self, server: Server, script: str, *args: str, path: str = "") -> Load:
        """One measured wrk run against `server` (at `path`, for scripts that take the URL's path)."""
        c = self.config
        url = server.url + path
        load = wrk(url, script, *args, seconds=c.seconds, connections=c.connections, threads=c.threads, pid=server.pid)
        self.load_averages.append(load_average())
        return load

    def warm(self, server: Server, script: str, *args: str, path: str = "") -> None:
        c = self.config
        if c.warmup:
            wrk(server.url + path, script, *args, seconds=c.warmup, connections=c.connections, threads=c.threads)

    def record(self, row: Row, load: Load) -> float:
        row.values.append(load.rate)
        row.errors += load.errors
        if load.cpu_us is not None:
            row.cpu_us.append(load.cpu_us)
        cpu = f", server CPU {load.cpu_us:,.0f} µs/request" if load.cpu_us is not None else ""
        say(f"  {row.name}: {load.rate:,.0f} req/s (p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms{cpu})")
        return load.rate

    # -- append ---------------------------------------------------------

    def part_append(self) -> None:
        c = self.config
        r = self.results
        ids = [f"s{i}" for i in range(c.sessions)]
        load_args = ("s", str(c.sessions))
        pg_schema = f"bench_{uuid.uuid4().hex[:10]}"
        pg_skip = self.postgres_skip_reason()
        naive_long = 1000
        ceiling = r.row("ceiling", "append", "framework ceiling (bare FastAPI, same body validation)", "req/s")
        always = r.row(
            "always",
            "append",
            "chatsessions, fsync=always",
            "req/s",
            ratio_name="x ceiling",
            target="≥ 0.75 x ceiling",
            passes=lambda v: v >= 0.75,
        )
        never = r.row(
            "never",
            "append",
            "chatsessions, fsync=never",
            "req/s",
            ratio_name="x ceiling",
            target="≥ 0.85 x ceiling",
            passes=lambda v: v >= 0.85,
        )
        naive = r.row(
            "naive",
            "append",
            "naive design, sessions start empty",
            "req/s",
            ratio_name="fsync=always ÷ naive",
            target="≥ 5",
            passes=lambda v: v >= 5,
        )
        naive_1k = r.row(
            "naive_1k",
            "append",
            f"naive design, sessions start at {naive_long:,} messages",
            "req/s",
            ratio_name="fsync=always ÷ naive",
            target="≥ 5",
            passes=lambda v: v >= 5,
        )
        postgres = r.row("postgres", "append", "chatsessions, PostgreSQL store", "req/s", ratio_name="x ceiling")
        if pg_skip:
            postgres.note = f"skipped: {pg_skip}"

        for round_no in range(1, c.rounds + 1):
            say(f"append, round {round_no}/{c.rounds}")
            with self.serve(Launch(app="ceiling_app:app")) as server:
                self.warm(server, "append.lua", *load_args)
                top = self.record(ceiling, self.load(server, "append.lua", *load_args))
            rates: dict[str, float] = {}
            for key, row, fsync in (("always", always, "always"), ("never", never, "never")):
                data_dir = self.fresh_dir(f"append-{fsync}")
                with self.serve(Launch(data_dir=data_dir, fsync=fsync)) as server:
                    put_sessions(server.url, ids)
                    self.warm(server, "append.lua", *load_args)
                    rates[key] = self.record(row, self.load(server, "append.lua", *load_args))
                row.ratios.append(rates[key] / top)
                shutil.rmtree(data_dir)
            for row, prefill in ((naive, 0), (naive_1k, naive_long)):
                data_dir = build_naive_store(self.fresh_dir("naive"), ids, prefill)
                with self.serve(Launch(app="naive_app:app", env={"NAIVE_DATA_DIR": str(data_dir)})) as server:
                    put_sessions(server.url, ids)
                    self.warm(server, "append.lua", *load_args)
                    rate = self.record(row, self.load(server, "append.lua", *load_args))
                row.ratios.append(rates["always"] / rate)
                lengths = naive_lengths(data_dir, ids)  # once the server has stopped: it may be mid-rewrite
                if lengths:
                    row.note = f"~{int(statistics.median(lengths)):,} messages a session at the end"
                shutil.rmtree(data_dir)
            if not pg_skip:
                env = {
                    "CHATSESSIONS_STORE": "postgres",
                    "CHATSESSIONS_POSTGRES_DSN": c.postgres_dsn,
                    "CHATSESSIONS_POSTGRES_SCHEMA": pg_schema,
                }
                pg_ids = [f"r{round_no}s{i}" for i in range(c.sessions)]
                data_dir = self.fresh_dir("unused")
                try:
                    with self.serve(Launch(data_dir=data_dir, env=env)) as server:
                        put_sessions(server.url, pg_ids)
                        self.warm(server, "append.lua", f"r{round_no}s", str(c.sessions))
                        rate = self.record(postgres, self.load(server, "append.lua", f"r{round_no}s", str(c.sessions)))
                    postgres.ratios.append(rate / top)
                finally:
                    asyncio.run(drop_schema(c.postgres_dsn, pg_schema))

    def postgres_skip_reason(self) -> str | None:
        try:
            import chatsessions.storage.postgres  # noqa: F401
        except ImportError:
            return "the store module chatsessions.storage.postgres is missing"
        try:
            asyncio.run(probe_postgres(self.config.postgres_dsn))
        except Exception as exc:
            return f"no database at CHATSESSIONS_BENCH_POSTGRES_DSN ({type(exc).__name__}: {exc})"
        return None

    # -- length ---------------------------------------------------------

    def one_session(self, count: int) -> Path:
        """A data directory with one session, "one0", of `count` messages appended one at a
        time as a chat does (so each is its own log record). Built once, then shared."""
        path = self.root / f"one-session-{count}"
        if not path.exists():
            build_file_store(path, [("one0", count)], per_append=1)
        return path

    def part_length(self) -> None:
        c = self.config
        r = self.results
        lengths = (10, 10_000, 100_000)
        rows = {
            n: r.row(
                f"length_{n}",
                "length",
                f"one session holding {n:,} messages, fsync=always",
                "req/s",
                ratio_name="÷ rate at 10" if n != 10 else "",
                target="≥ 0.9" if n == 100_000 else "",
                passes=(lambda v: v >= 0.9) if n == 100_000 else None,
            )
            for n in lengths
        }
        for round_no in range(1, c.rounds + 1):
            say(f"length, round {round_no}/{c.rounds}")
            rates: dict[int, float] = {}
            for n in rotated(lengths, round_no):
                data_dir = self.fresh_dir(f"one-{n}")
                shutil.copytree(self.one_session(n), data_dir)
                os.sync()  # see build_file_store
                with self.serve(Launch(data_dir=data_dir)) as server:
                    append_some(server.url, "one0", 50)  # warm-up that leaves the length as it was
                    rates[n] = self.record(rows[n], self.load(server, "append.lua", "one", "1"))
                    with httpx.Client(base_url=server.url) as client:
                        end = client.get("/v1/sessions/one0").json()["message_count"]
                rows[n].note = f"grew by {end - n:,} during a run"
                shutil.rmtree(data_dir)
            for n in lengths[1:]:
                rows[n].ratios.append(rates[n] / rates[10])

    # -- read -----------------------------------------------------------

    def part_read(self) -> None:
        c = self.config
        r = self.results
        last50 = "/v1/sessions/one0/messages?order=desc&limit=50"
        rows = {
            10: r.row("read_10", "read", "last 50 messages of a 10-message session (answers 10)", "req/s"),
            100_000: r.row(
                "read_100k",
                "read",
                "last 50 messages of a 100,000-message session",
                "req/s",
                ratio_name="time per read ÷ 10-message read",
                target="≤ 1.5",
                passes=lambda v: v <= 1.5,
            ),
        }
        same_answer = r.row(
            "read_100k_10",
            "read",
            "last 10 messages of the 100,000-message session (the same answer as the 10-message read)",
            "req/s",
            ratio_name="time per read ÷ 10-message read",
        )
        cold = r.row(
            "read_cold", "read", "first read of the 100,000-message session after start (builds its index)", "ms"
        )
        for round_no in range(1, c.rounds + 1):
            say(f"read, round {round_no}/{c.rounds}")
            rates: dict[int, float] = {}
            rate_last10 = 0.0
            for n in rotated(tuple(rows), round_no):
                # Reads change nothing, so the shared directory serves as it is.
                with self.serve(Launch(data_dir=self.one_session(n))) as server:
                    first = timed_get(server.url, last50)
                    if n == 100_000:
                        cold.values.append(first)
                    self.warm(server, "read.lua", path=last50)
                    rates[n] = self.record(rows[n], self.load(server, "read.lua", path=last50))
                    if n == 100_000:
                        last10 = self.load(server, "read.lua", path=last50.replace("limit=50", "limit=10"))
                        rate_last10 = self.record(same_answer, last10)
            rows[100_000].ratios.append(rates[10] / rates[100_000])
            same_answer.ratios.append(rates[10] / rate_last10)

    # -- startup --------------------------------------------------------

    def part_startup(self) -> None:
        c = self.config
        r = self.results
        count = 100_000
        data_dir = build_file_store(self.root / "startup", [(f"s{i}", 0) for i in range(count)])
        empty = r.row("start_empty", "startup", "start-up, empty data directory (Python, imports, uvicorn)", "s")
        clean = r.row(
            "start_100k",
            "startup",
            f"start-up with {count:,} sessions on disk (after a clean stop)",
            "s",
            target="< 2 s",
            passes=lambda v: v < 2.0,
        )
        store = r.row("open_100k", "startup", f"of which opening the file store with {count:,} sessions", "s")
        crashed = r.row("start_100k_kill", "startup", f"start-up with {count:,} sessions, after kill -9", "s")
        rss = r.row("rss_100k", "startup", f"resident memory after start with {count:,} sessions", "MiB")
        for round_no in range(1, c.rounds + 1):
            say(f"startup, round {round_no}/{c.rounds}")
            empty_dir = self.fresh_dir("empty")
            with self.serve(Launch(data_dir=empty_dir)) as server:
                empty.values.append(server.started_in)
            shutil.rmtree(empty_dir)
            with self.serve(Launch(data_dir=data_dir)) as server:
                clean.values.append(server.started_in)
                rss.values.append(server.rss_mib())
            store.values.append(asyncio.run(time_open(data_dir)))
            with self.serve(Launch(data_dir=data_dir)) as server:
                server.stop(signal.SIGKILL)
            with self.serve(Launch(data_dir=data_dir)) as server:
                crashed.values.append(server.started_in)
            say(
                f"  empty {empty.values[-1]:.2f} s, {count:,} sessions {clean.values[-1]:.2f} s "
                f"(store open {store.values[-1]:.2f} s), after kill -9 {crashed.values[-1]:.2f} s"
            )

    # -- memory ---------------------------------------------------------

    def part_memory(self) -> None:
        c = self.config
        r = self.results
        count, length = 10_000, 100
        ids = [f"m{i}" for i in range(count)]
        data_dir = build_file_store(self.root / "memory", [(session_id, length) for session_id in ids])
        # The defaults, whatever this shell's CHATSESSIONS_* say (the servers run without them).
        cache_sessions, cache_bytes = (Settings.model_fields[f].default for f in ("cache_sessions", "cache_bytes"))
        limits = f"cache_sessions={cache_sessions:,}, cache_bytes={cache_bytes // 2**20} MiB"
        start = r.row("rss_start", "memory", f"RSS after start, {count:,} sessions x {length} messages on disk", "MiB")
        after_1k = r.row("rss_1k", "memory", "RSS after reading 1,000 of them (100 messages each)", "MiB")
        after_all = r.row(
            "rss_10k",
            "memory",
            f"RSS after reading all {count:,} ({limits}, the defaults)",
            "MiB",
            ratio_name="÷ after 1,000",
        )
        for round_no in range(1, c.rounds + 1):
            say(f"memory, round {round_no}/{c.rounds}")
            with self.serve(Launch(data_dir=data_dir)) as server:
                start.values.append(server.rss_mib())
                read_sessions(server.port, ids[:1000], length)
                first = server.rss_mib()
                after_1k.values.append(first)
                read_sessions(server.port, ids[1000:], length)
                after_all.values.append(server.rss_mib())
                after_all.ratios.append(after_all.values[-1] / first)
                say(f"  RSS start {start.values[-1]:.0f} MiB, 1k {first:.0f} MiB, 10k {after_all.values[-1]:.0f} MiB")

    # -- all ------------------------------------------------------------

    def run(self) -> str:
        c = self.config
        started = time.perf_counter()
        for part in c.parts:
            getattr(self, f"part_{part}")()
        minutes = (time.perf_counter() - started) / 60
        busy = ""
        if self.load_averages:
            low, high = min(self.load_averages), max(self.load_averages)
            busy = f" Load average (1 min) right after the wrk runs: {low:.1f}-{high:.1f} on {os.cpu_count()} cores."
        return "\n".join(
            [
                f"Machine: {machine()}.",
                f"Load: wrk, {c.threads} thread(s), {c.connections} connections, {c.seconds} s per run after a "
                f"{c.warmup} s warm-up; ~300-byte message bodies; {c.rounds} rounds; "
                f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; took {minutes:.1f} min.{busy}",
                "",
                self.results.table(),
                "",
            ]
        )

    @property
    def errors(self) -> int:
        return sum(row.errors for row in self.results.rows.values())


def rotated(items: tuple[int, ...], round_no: int) -> tuple[int, ...]:
    """A different order each round, so that a drift of the machine favours no case."""
    shift = round_no % len(items)
    return items[shift:] + items[:shift]


def naive_lengths(data_dir: Path, ids: list[str]) -> list[int]:
    """Messages in each of the naive app's session files (the readable ones)."""
    lengths = []
    for session_id in ids:
        try:
            lengths.append(len(json.loads((data_dir / f"{session_id}.json").read_text())["messages"]))
        except (OSError, ValueError, KeyError):
            say(f"  naive session file {session_id}.json is unreadable")
    return lengths


async def time_open(data_dir: Path) -> float:
    """Seconds for the file store alone to open `data_dir` (in this process: no imports counted)."""
    started = time.perf_counter()
    repo = await FileSessionRepository.open(Settings(data_dir=data_dir))
    elapsed = time.perf_counter() - started
    await repo.aclose()
    return elapsed


def read_sessions(port: int, ids: list[str], length: int, *, parallel: int = 8) -> None:
    """GET every message of each session once (one page of `length`).

    Plain http.client on a few threads, one keep-alive connection each: an async
    client in this process would cost more CPU than the server and measure itself."""
    local = threading.local()

    def read(session_id: str) -> None:
        conn: http.client.HTTPConnection | None = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", f"/v1/sessions/{session_id}/messages?limit={length}")
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200 or len(json.loads(body)["items"]) != length:
            raise RuntimeError(f"GET messages of {session_id}: {answer.status} {body[:200]!r}")

    with ThreadPoolExecutor(parallel) as pool:
        for _ in pool.map(read, ids):
            pass


async def probe_postgres(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=3)
    await conn.close()


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def main() -> int:
    check_wrk()
    config = Config()
    unknown = [part for part in config.parts if part not in PARTS]
    if unknown:
        print(f"bench: unknown part(s) {', '.join(unknown)} in BENCH_ONLY; choose from {', '.join(PARTS)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="chatsessions-bench-") as tmp:
        bench = Bench(config, Path(tmp))
        report = bench.run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    say(f"written to {RESULTS}")
    if bench.errors:
        say(f"FAILED: {bench.errors} requests answered an error or failed; the figures marked 'errors!' are invalid")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
