"""`make bench`: the benchmarks of issues 5 and 9 in one command.

Starts every server it measures (each on a free port, with a fresh temporary
data directory, the settings of `chatsessions serve`), drives the load with
wrk or a few plain HTTP clients, and prints a Markdown table, also written to
bench/results/latest.md. A rate is the median of BENCH_ROUNDS runs; a ratio is
the median of the ratios measured within one round (both sides of a ratio
always come from the same round, measured within about a minute). Other work on
the machine moves rates by ±30 %: compare ratios and the CPU column. The parts marked
"once" measure bounds, not rates, and run one round whatever BENCH_ROUNDS says.

The store under test is chosen in one place, `Config.store` (BENCH_STORE, by
default `sqlite`; the PostgreSQL row of the append part always runs too). Data
sets are written in-process through that store's repository
(`chatsessions.main.build_repository`, fsync=never, many concurrent calls so
that group commit batches them), never at HTTP speed, and shared between parts.

Parts (BENCH_ONLY=append,cpu,create,... runs a subset, in the order given):

- append:  64 connections appending ~300-byte messages over 64 sessions to the
           framework ceiling (bench/ceiling_app.py), chatsessions with
           fsync=always and fsync=never, the naive design (bench/naive_app.py)
           from empty sessions and from sessions of ~1,000 messages, and the
           PostgreSQL store when a database answers (its own schema, dropped after);
- cpu:     in-process (no HTTP) CPU time per append through the repository,
           64 tasks appending to 64 sessions with fsync=always: event loop and
           writer thread together, against issue 9's ~150 µs for the old file
           store (the same part run on the file store's last commit gave 52-69 µs);
- create:  sessions created over HTTP (POST /v1/sessions, one fsync'd change
           each, group-committed) against appends on the same server;
- length:  the append load on ONE session that holds 10, 10,000 or 100,000 messages;
- read:    the last 50 messages (order=desc&limit=50) of a 100,000-message
           session against those of a 10-message session;
- scale:   200,000 sessions of 10,000 users (20 each): one user's listing
           (GET /v1/sessions?user_id=U), the first unfiltered page of 100, a
           page of 100 after a cursor ~199,000 sessions deep (reached once by
           walking next_cursor, so the bench knows nothing of the cursor's format),
           and /healthz latency (a probe every 10 ms) while four wrk connections
           list the first page in a loop;
- startup: start-up of an empty store, a clean restart with the 200,000
           sessions, a clean stop (SIGTERM until the process exits, after a
           listing load) and a restart after kill -9 under an append load;
- keys:    (once) 50,000 appends, each with its own Idempotency-Key: RSS growth,
           RSS after a restart (and a replay of one of the keys after it), and
           200 keyed appends of 1 MiB;
- bigread: (once) 3 clients reading a session of 200 x 1 MiB messages at once,
           each following has_more page by page (limit=1000; pages stop at
           CHATSESSIONS_MAX_PAGE_BYTES) again and again while 8 wrk connections
           append to that session for BENCH_SECONDS: the peak RSS growth (VmHWM,
           reset before the reads) and the p99 of those appends;
- memory:  (once) resident memory with 10,000 sessions x 30 messages (~90 MB, more
           than the default 64 MiB cache; 100 each took ~3 minutes to write through
           the store), after start and after reading 1,000 and then all 10,000 of them.

Environment: BENCH_SECONDS (seconds per wrk run, default 10), BENCH_WARMUP
(default 1), BENCH_ROUNDS (default 3), BENCH_CONNECTIONS (64), BENCH_SESSIONS
(64), BENCH_WRK_THREADS (1: wrk needs little CPU and the server gets the other
core), BENCH_ONLY, BENCH_STORE (sqlite; memory only for parts that restart
nothing: append, cpu, create), BENCH_SCALE_SESSIONS (200000), BENCH_KEYED_APPENDS
(50000), CHATSESSIONS_BENCH_POSTGRES_DSN (default
postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import random
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from chatsessions.config import FsyncMode, Settings, StoreKind
from chatsessions.main import build_repository
from chatsessions.models import DEFAULT_TENANT, MessageCreate, Role, SessionCreate

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "latest.md"
PARTS = ("append", "cpu", "create", "length", "read", "scale", "startup", "keys", "bigread", "memory")
CONTENT = "The quick brown fox jumps over the lazy dog. " * 5  # the same text as append.lua
BIG_CONTENT = "x" * 2**20  # 1 MiB, the largest content the defaults accept
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
OLD_STORE_CPU_US = 150  # issue 9's figure for the old file store's CPU per append
# The same `cpu` part run on the last commit that had the file store (339be13), alternating with
# the sqlite store on this machine (2026-12-02): the file store took 52 and 69 µs, sqlite 133 and 137.
OLD_STORE_SAME_METHOD = "the file store by this method: 52-69 µs (2026-12-02, alternating runs)"


def _env_int(name: str, default: int) -> int:
    return max(1, int(os.environ.get(name, default)))


def default_store() -> str:
    """The embedded store under test: BENCH_STORE, else sqlite."""
    return os.environ.get("BENCH_STORE") or StoreKind.sqlite.value


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
    store: str = field(default_factory=default_store)  # the one place that picks the embedded store
    scale_sessions: int = field(default_factory=lambda: _env_int("BENCH_SCALE_SESSIONS", 200_000))
    keyed_appends: int = field(default_factory=lambda: _env_int("BENCH_KEYED_APPENDS", 50_000))
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
    """What to start: a bench app (`app`, served by uvicorn) or `chatsessions serve` with `store` on `data_dir`."""

    app: str | None = None
    store: str = ""
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
            sys.executable, "-m", "chatsessions.cli", "serve", "--port", str(port), "--store", self.store,
            "--data-dir", str(self.data_dir), "--fsync", self.fsync, "--log-level", self.log_level,
        ]  # fmt: skip


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_in: float = 0.0  # seconds from process start until /healthz answered
    stopped_in: float | None = None  # seconds from SIGTERM until the process exited

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _status_mib(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key} in /proc status")

    def rss_mib(self) -> float:
        return self._status_mib("VmRSS")

    def peak_rss_mib(self) -> float:
        """The most resident memory since start, or since `reset_peak_rss`."""
        return self._status_mib("VmHWM")

    def reset_peak_rss(self) -> None:
        """Start VmHWM again from the current RSS (Linux: 5 > clear_refs); harmless where refused."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError as exc:
            say(f"  could not reset the peak RSS ({exc}): the peak counts from start-up")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            started = time.perf_counter()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                say(f"  the server on port {self.port} did not exit within 120 s of {sig.name}: killed")
                self.proc.kill()
                self.proc.wait()
                return
            if sig is signal.SIGTERM:
                self.stopped_in = time.perf_counter() - started


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
                if time.perf_counter() - started > 180:
                    raise RuntimeError(f"server did not answer /healthz in 180 s:\n{server.log_tail()}")
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
    url: str,
    script: str,
    *args: str,
    seconds: int,
    connections: int,
    threads: int,
    pid: int | None = None,
    expect_errors: bool = False,
    until: Path | None = None,
) -> Load:
    """One wrk run; with `until`, it ends (SIGINT) as soon as the script creates that file."""
    cpu_before = cpu_seconds(pid) if pid else 0.0
    command = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(BENCH_DIR / script), url, "--", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if until is not None:
        while proc.poll() is None and not until.exists():
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate()
    cpu = cpu_seconds(pid) - cpu_before if pid else None
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{stdout}\n{stderr}")
    data: dict[str, int] = json.loads(line[len("BENCH ") :])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    if errors and not expect_errors:
        say(f"  WARNING: {errors} errors in this run: {data}")
    requests = data["requests"]
    cpu_us = cpu * 1e6 / requests if cpu is not None and requests else None
    return Load(requests, data["duration_us"] / 1e6, errors, data["p50_us"] / 1e3, data["p99_us"] / 1e3, cpu_us)


class Client:
    """One keep-alive HTTP/1.1 connection (plain http.client: an async client in this
    process would cost more CPU than the server and measure itself)."""

    def __init__(self, port: int, *, timeout: float = 120) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if payload is not None else {}
        sent.update(headers or {})
        started = time.perf_counter()
        self.conn.request(method, path, body=payload, headers=sent)
        answer = self.conn.getresponse()
        data = answer.read()
        elapsed = time.perf_counter() - started
        return Answer(answer.status, data, elapsed * 1e3, dict(answer.getheaders()))

    def get(self, path: str) -> Answer:
        answer = self.call("GET", path)
        if answer.status != 200:
            raise RuntimeError(f"GET {path}: {answer.status} {answer.body[:200]!r}")
        return answer

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    ms: float
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


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


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- building data directories in-process ---------------------------------


@dataclass(frozen=True)
class Seed:
    """One session to write: `messages` messages of `content`, `per_append` per append
    (so per change), by `writers` concurrent appenders (group commit batches them)."""

    id: str
    user_id: str | None = None
    messages: int = 0
    per_append: int = 1
    writers: int = 1
    content: str = CONTENT


def bench_message(content: str = CONTENT) -> MessageCreate:
    return MessageCreate(role=Role.user, content=content, metadata={"client": "prefill", "lang": "en"})


def run_async(coro: Any) -> Any:
    """Run a coroutine on uvloop, as the server does."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def store_settings(store: str, data_dir: Path, fsync: FsyncMode) -> Settings:
    return Settings(store=StoreKind(store), data_dir=data_dir, fsync=fsync)


async def _fill(settings: Settings, seeds: Iterable[Seed], *, parallel: int) -> None:
    repo = await build_repository(settings)
    pending = iter(seeds)

    async def fill_one(seed: Seed) -> None:
        await repo.create_session(
            DEFAULT_TENANT, SessionCreate(id=seed.id, user_id=seed.user_id, title=f"bench {seed.id}")
        )
        batch = [bench_message(seed.content)] * seed.per_append
        starts = iter(range(0, seed.messages, seed.per_append))

        async def writer() -> None:
            for start in starts:  # shared between the writers: each start is taken once
                await repo.append_messages(
                    DEFAULT_TENANT, seed.id, batch[: min(seed.per_append, seed.messages - start)]
                )

        await asyncio.gather(*(writer() for _ in range(seed.writers)))

    async def worker() -> None:
        for seed in pending:  # shared between the workers
            await fill_one(seed)

    try:
        await asyncio.gather(*(worker() for _ in range(parallel)))
    finally:
        await repo.aclose()


def build_store(store: str, data_dir: Path, seeds: list[Seed], *, parallel: int = 256) -> Path:
    """A data directory of `store` holding `seeds`, written in-process through the store's
    repository with fsync=never and `parallel` sessions in flight."""
    started = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_async(_fill(store_settings(store, data_dir, FsyncMode.never), seeds, parallel=parallel))
    # Flush it all now: on ext4 an fsync waits for other files' dirty data, so pages
    # left dirty here would slow the fsyncs of the next measurement.
    os.sync()
    total = sum(seed.messages for seed in seeds)
    elapsed = time.perf_counter() - started
    say(f"  built {data_dir.name} ({store}): {len(seeds):,} sessions, {total:,} messages in {elapsed:.1f} s")
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
    os.sync()  # see build_store
    return data_dir


async def time_open(store: str, data_dir: Path) -> float:
    """Seconds for the store alone to open `data_dir` (in this process: no imports counted)."""
    started = time.perf_counter()
    repo = await build_repository(store_settings(store, data_dir, FsyncMode.always))
    elapsed = time.perf_counter() - started
    await repo.aclose()
    return elapsed


async def inprocess_appends(store: str, data_dir: Path, *, sessions: int, appends: int) -> tuple[float, float]:
    """CPU microseconds per append and appends per second, in this process through the
    repository (fsync=always): `sessions` tasks, each appending to its own session."""
    repo = await build_repository(store_settings(store, data_dir, FsyncMode.always))
    message = [bench_message()]
    ids = [f"cpu{i}" for i in range(sessions)]
    try:
        await asyncio.gather(*(repo.create_session(DEFAULT_TENANT, SessionCreate(id=i)) for i in ids))

        async def append(session_id: str, count: int) -> None:
            for _ in range(count):
                await repo.append_messages(DEFAULT_TENANT, session_id, message)

        await asyncio.gather(*(append(i, 20) for i in ids))  # warm-up
        per_task = max(1, appends // sessions)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        await asyncio.gather(*(append(i, per_task) for i in ids))
        cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    finally:
        await repo.aclose()
    done = per_task * sessions
    return cpu * 1e6 / done, done / wall


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
    passes: Callable[[float], bool] | None = None  # on the ratio when there is one, else the figure
    passes_either: Callable[[float, float], bool] | None = None  # on (figure, ratio)
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
        if self.passes_either is not None and self.values and self.ratios:
            met = self.passes_either(statistics.median(self.values), statistics.median(self.ratios))
        elif self.passes is not None and (self.ratios or self.values):
            met = self.passes(statistics.median(self.ratios) if self.ratios else statistics.median(self.values))
        else:
            return ""
        return "met" if met else "**missed**"


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
        self._deep: tuple[str, int] | None = None

    def serve(self, launch: Launch) -> AbstractContextManager[Server]:
        return serve(launch, log_dir=self.logs)

    def embedded(self, data_dir: Path, *, fsync: str = "always") -> Launch:
        """`chatsessions serve` on the store under test."""
        return Launch(store=self.config.store, data_dir=data_dir, fsync=fsync)

    def build(self, data_dir: Path, seeds: list[Seed], *, parallel: int = 256) -> Path:
        return build_store(self.config.store, data_dir, seeds, parallel=parallel)

    def fresh_dir(self, name: str) -> Path:
        return self.root / f"{name}-{uuid.uuid4().hex[:8]}"

    def copy_of(self, source: Path, name: str) -> Path:
        data_dir = self.fresh_dir(name)
        shutil.copytree(source, data_dir)
        os.sync()  # see build_store
        return data_dir

    def load(self, server: Server, script: str, *args: str, path: str = "", connections: int = 0) -> Load:
        """One measured wrk run against `server` (at `path`, for scripts that take the URL's path)."""
        c = self.config
        url = server.url + path
        load = wrk(
            url,
            script,
            *args,
            seconds=c.seconds,
            connections=connections or c.connections,
            threads=c.threads,
            pid=server.pid,
        )
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
            f"chatsessions ({c.store}), fsync=always",
            "req/s",
            ratio_name="x ceiling",
            target="≥ 0.8 x ceiling",
            passes=lambda v: v >= 0.8,
        )
        never = r.row(
            "never",
            "append",
            f"chatsessions ({c.store}), fsync=never",
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
        postgres = r.row(
            "postgres",
            "append",
            "chatsessions, PostgreSQL store",
            "req/s",
            ratio_name="x ceiling",
            target="≥ 0.5 x ceiling",
            passes=lambda v: v >= 0.5,
        )
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
                with self.serve(self.embedded(data_dir, fsync=fsync)) as server:
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
                env = {"CHATSESSIONS_POSTGRES_DSN": c.postgres_dsn, "CHATSESSIONS_POSTGRES_SCHEMA": pg_schema}
                pg_ids = [f"r{round_no}s{i}" for i in range(c.sessions)]
                data_dir = self.fresh_dir("unused")
                try:
                    with self.serve(Launch(store="postgres", data_dir=data_dir, env=env)) as server:
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

    # -- cpu ------------------------------------------------------------

    def part_cpu(self) -> None:
        c = self.config
        r = self.results
        appends = 20_000
        row = r.row(
            "cpu",
            "cpu",
            f"in-process append through the {c.store} repository, fsync=always, {c.sessions} tasks "
            "(CPU of event loop and writer thread per append)",
            "µs",
            target=f"< {OLD_STORE_CPU_US} µs (issue 9's figure for the old store)",
            passes=lambda v: v < OLD_STORE_CPU_US,
            note=OLD_STORE_SAME_METHOD,
        )
        rate = r.row("cpu_rate", "cpu", "of which the rate, in-process", "appends/s")
        for round_no in range(1, c.rounds + 1):
            say(f"cpu, round {round_no}/{c.rounds}")
            data_dir = self.fresh_dir("cpu")
            data_dir.mkdir()
            cpu_us, per_second = run_async(inprocess_appends(c.store, data_dir, sessions=c.sessions, appends=appends))
            shutil.rmtree(data_dir)
            row.values.append(cpu_us)
            rate.values.append(per_second)
            say(f"  {cpu_us:,.0f} µs of CPU per append, {per_second:,.0f} appends/s")

    # -- create ---------------------------------------------------------

    def part_create(self) -> None:
        c = self.config
        r = self.results
        appends = r.row("create_appends", "create", "appends on the same server, fsync=always", "req/s")
        creates = r.row(
            "creates",
            "create",
            "sessions created over HTTP (POST /v1/sessions), fsync=always",
            "req/s",
            ratio_name="÷ appends",
            target="≥ 1",
            passes=lambda v: v >= 1.0,
        )
        ids = [f"s{i}" for i in range(c.sessions)]
        load_args = ("s", str(c.sessions))
        for round_no in range(1, c.rounds + 1):
            say(f"create, round {round_no}/{c.rounds}")
            data_dir = self.fresh_dir("create")
            with self.serve(self.embedded(data_dir)) as server:
                put_sessions(server.url, ids)
                self.warm(server, "append.lua", *load_args)
                self.warm(server, "create.lua", "warm-user-")
                rates: dict[str, float] = {}
                order = ("append", "create") if round_no % 2 else ("create", "append")
                for kind in order:
                    if kind == "append":
                        rates[kind] = self.record(appends, self.load(server, "append.lua", *load_args))
                    else:
                        rates[kind] = self.record(creates, self.load(server, "create.lua", f"r{round_no}-user-"))
                creates.ratios.append(rates["create"] / rates["append"])
            shutil.rmtree(data_dir)

    # -- length ---------------------------------------------------------

    def one_session(self, count: int) -> Path:
        """A data directory with one session, "one0", of `count` messages, one message per
        append as a chat does (so each its own change). Built once, then shared."""
        path = self.root / f"one-session-{count}"
        if not path.exists():
            self.build(path, [Seed("one0", messages=count, writers=min(256, count))], parallel=1)
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
                data_dir = self.copy_of(self.one_session(n), f"one-{n}")
                with self.serve(self.embedded(data_dir)) as server:
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
        cold = r.row("read_cold", "read", "first read of the 100,000-message session after start", "ms")
        for round_no in range(1, c.rounds + 1):
            say(f"read, round {round_no}/{c.rounds}")
            rates: dict[int, float] = {}
            rate_last10 = 0.0
            for n in rotated(tuple(rows), round_no):
                # Reads change nothing, but a copy keeps the shared directory as the store left it.
                data_dir = self.copy_of(self.one_session(n), f"read-{n}")
                with self.serve(self.embedded(data_dir)) as server:
                    first = timed_get(server.url, last50)
                    if n == 100_000:
                        cold.values.append(first)
                    self.warm(server, "read.lua", path=last50)
                    rates[n] = self.record(rows[n], self.load(server, "read.lua", path=last50))
                    if n == 100_000:
                        last10 = self.load(server, "read.lua", path=last50.replace("limit=50", "limit=10"))
                        rate_last10 = self.record(same_answer, last10)
                shutil.rmtree(data_dir)
            rows[100_000].ratios.append(rates[10] / rates[100_000])
            same_answer.ratios.append(rates[10] / rate_last10)

    # -- scale ----------------------------------------------------------

    def scale_users(self) -> int:
        return max(1, self.config.scale_sessions // 20)

    def scale_dir(self) -> Path:
        """BENCH_SCALE_SESSIONS sessions "scale-<i>" of users "user-<i mod users>" (20 each),
        created in order (so "scale-0" is the oldest). Built once, then shared."""
        path = self.root / "scale"
        if not path.exists():
            users = self.scale_users()
            seeds = [Seed(f"scale-{i}", user_id=f"user-{i % users}") for i in range(self.config.scale_sessions)]
            self.build(path, seeds, parallel=512)
        return path

    def deep_index(self) -> int:
        """Sessions older than the deep cursor: 1,000 of 200,000, and never so few that the page is short."""
        return max(200, self.config.scale_sessions // 200)

    def deep_cursor(self, client: Client) -> tuple[str, int]:
        """The `next_cursor` after which only ~`deep_index` sessions remain (the page after it is
        full), found by walking the listing 100 at a time as a client would; and the pages walked.
        Built once, then shared: the cursor stays valid while the sessions stay as they are."""
        if self._deep is None:
            n = self.config.scale_sessions
            path, seen, pages, token = "/v1/sessions?limit=100", 0, 0, ""
            while seen < n - self.deep_index():
                page = client.get(path + (f"&cursor={token}" if token else "")).json()
                seen += len(page["items"])
                pages += 1
                if not page.get("next_cursor"):
                    raise RuntimeError(f"the listing ended after {seen:,} of {n:,} sessions")
                token = page["next_cursor"]
            self._deep = token, pages
        return self._deep

    def part_scale(self) -> None:
        c = self.config
        r = self.results
        n = c.scale_sessions
        users = self.scale_users()
        per_user = n // users
        user_list = r.row(
            "scale_user",
            "scale",
            f"{n:,} sessions: one user's listing (GET /v1/sessions?user_id=U, {per_user} sessions), median",
            "ms",
            target="≤ 20 ms",
            passes=lambda v: v <= 20,
        )
        first = r.row(
            "scale_first",
            "scale",
            f"{n:,} sessions: first unfiltered page of 100, median",
            "ms",
            target="≤ 50 ms",
            passes=lambda v: v <= 50,
        )
        deep = r.row(
            "scale_deep",
            "scale",
            f"{n:,} sessions: a page of 100 after a cursor ~{n - self.deep_index():,} sessions deep, median",
            "ms",
            ratio_name="÷ first page",
            target="≤ 2",
            passes=lambda v: v <= 2,
        )
        health = r.row(
            "scale_healthz",
            "scale",
            "/healthz p99 while 4 connections list the first page of 100 in a loop",
            "ms",
            target="≤ 200 ms",
            passes=lambda v: v <= 200,
        )
        listing = r.row("scale_list_rate", "scale", "of which the listing rate (4 connections)", "req/s")
        data_dir = self.scale_dir()
        for round_no in range(1, c.rounds + 1):
            say(f"scale, round {round_no}/{c.rounds}")
            with self.serve(self.embedded(data_dir)) as server:
                client = Client(server.port)
                client.get("/v1/sessions?limit=100")  # the first request after start warms whatever it warms
                picked = random.Random(round_no).sample(range(users), min(200, users))
                user_ms = []
                for u in picked:
                    answer = client.get(f"/v1/sessions?user_id=user-{u}&limit={min(per_user, 100)}")
                    if len(answer.json()["items"]) != min(per_user, 100):
                        raise RuntimeError(f"user-{u} has {len(answer.json()['items'])} sessions, not {per_user}")
                    user_ms.append(answer.ms)
                first_ms = [client.get("/v1/sessions?limit=100").ms for _ in range(50)]
                walk_started = time.perf_counter()
                token, walked = self.deep_cursor(client)
                if round_no == 1:
                    deep.note = (
                        f"cursor reached by walking {walked:,} pages in {time.perf_counter() - walk_started:.1f} s"
                    )
                deep_ms = []
                for _ in range(50):
                    answer = client.get(f"/v1/sessions?limit=100&cursor={token}")
                    if len(answer.json()["items"]) != 100:
                        raise RuntimeError(f"the deep page has {len(answer.json()['items'])} sessions, not 100")
                    deep_ms.append(answer.ms)
                user_list.values.append(statistics.median(user_ms))
                first.values.append(statistics.median(first_ms))
                deep.values.append(statistics.median(deep_ms))
                deep.ratios.append(deep.values[-1] / first.values[-1])
                load, health_ms = self.healthz_during(server, client, "read.lua", path="/v1/sessions?limit=100")
                self.record(listing, load)
                health.values.append(percentile(health_ms, 0.99))
                client.close()
            say(
                f"  user listing {user_list.values[-1]:.1f} ms, first page {first.values[-1]:.1f} ms, deep page "
                f"{deep.values[-1]:.1f} ms, /healthz p99 {health.values[-1]:.1f} ms ({len(health_ms)} probes)"
            )

    def healthz_during(
        self, server: Server, client: Client, script: str, *args: str, path: str = ""
    ) -> tuple[Load, list[float]]:
        """/healthz latencies (ms), one probe every 10 ms, while wrk runs `script` on 4 connections."""
        c = self.config
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                wrk, server.url + path, script, *args, seconds=c.seconds, connections=4, threads=1, pid=server.pid
            )
            time.sleep(0.2)  # let the load start
            probes = []
            while not running.done():
                probes.append(client.get("/healthz").ms)
                time.sleep(0.01)
            load = running.result()
        self.load_averages.append(load_average())
        return load, probes

    # -- startup --------------------------------------------------------

    def part_startup(self) -> None:
        c = self.config
        r = self.results
        n = c.scale_sessions
        data_dir = self.scale_dir()
        empty = r.row("start_empty", "startup", "start-up, empty store (Python, imports, uvicorn)", "s")
        clean = r.row(
            "start_clean",
            "startup",
            f"start-up with {n:,} sessions, after a clean stop",
            "s",
            ratio_name="÷ empty start",
            target="≤ 2 s, or ≤ 1.5 x empty start",
            passes_either=lambda value, ratio: value <= 2 or ratio <= 1.5,
        )
        store_open = r.row("open_store", "startup", f"of which opening the {c.store} store (in-process)", "s")
        rss = r.row("start_rss", "startup", f"resident memory after start with {n:,} sessions", "MiB")
        stop = r.row(
            "stop_clean",
            "startup",
            f"clean stop with {n:,} sessions (SIGTERM until exit, after a listing load)",
            "s",
            target="≤ 2 s",
            passes=lambda v: v <= 2,
        )
        crashed = r.row(
            "start_kill",
            "startup",
            f"start-up with {n:,} sessions, after kill -9 under an append load",
            "s",
            target="≤ 3 s",
            passes=lambda v: v <= 3,
        )
        for round_no in range(1, c.rounds + 1):
            say(f"startup, round {round_no}/{c.rounds}")
            empty_dir = self.fresh_dir("empty")
            with self.serve(self.embedded(empty_dir)) as server:
                empty.values.append(server.started_in)
            shutil.rmtree(empty_dir)
            with self.serve(self.embedded(data_dir)) as server:
                clean.values.append(server.started_in)
                rss.values.append(server.rss_mib())
                wrk(server.url + "/v1/sessions?limit=100", "read.lua", seconds=2, connections=4, threads=1)
                server.stop()
                stop.values.append(server.stopped_in if server.stopped_in is not None else float("nan"))
            clean.ratios.append(clean.values[-1] / empty.values[-1])
            store_open.values.append(run_async(time_open(c.store, data_dir)))
            with self.serve(self.embedded(data_dir)) as server, ThreadPoolExecutor(1) as pool:
                load = pool.submit(
                    wrk, server.url, "append.lua", "scale-", "64", seconds=3, connections=64, threads=1,
                    expect_errors=True,
                )  # fmt: skip
                time.sleep(2)
                server.stop(signal.SIGKILL)
                load.result()
            with self.serve(self.embedded(data_dir)) as server:
                crashed.values.append(server.started_in)
                Client(server.port).get("/v1/sessions/scale-0")
            say(
                f"  empty {empty.values[-1]:.2f} s, {n:,} sessions {clean.values[-1]:.2f} s "
                f"(store open {store_open.values[-1]:.2f} s), stop {stop.values[-1]:.2f} s, "
                f"after kill -9 {crashed.values[-1]:.2f} s"
            )

    # -- keys -----------------------------------------------------------

    def part_keys(self) -> None:
        c = self.config
        r = self.results
        count = c.keyed_appends
        growth = r.row(
            "keys_growth",
            "keys",
            f"RSS growth over {count:,} appends, each with its own Idempotency-Key",
            "MiB",
            target="≤ 64 MiB",
            passes=lambda v: v <= 64,
        )
        rate = r.row("keys_rate", "keys", "of which the rate of keyed appends", "req/s")
        restart = r.row(
            "keys_restart",
            "keys",
            f"RSS after a restart with those {count:,} keys",
            "MiB",
            target="≤ 200 MiB",
            passes=lambda v: v <= 200,
        )
        big = r.row("keys_big", "keys", "RSS growth over 200 keyed appends of 1 MiB (after the restart)", "MiB")
        say("keys")
        ids = [f"k{i}" for i in range(c.sessions)]
        data_dir = self.fresh_dir("keys")
        with self.serve(self.embedded(data_dir)) as server:
            put_sessions(server.url, ids)
            self.warm(server, "append.lua", "k", str(c.sessions))  # without keys: caches and arenas warm up
            time.sleep(0.5)
            before = server.rss_mib()
            marker = self.fresh_dir("keyed-done")
            load = wrk(
                server.url, "keyed.lua", "k", str(c.sessions), str(count), "key-", str(marker),
                seconds=3600, connections=c.connections, threads=1, pid=server.pid, until=marker,
            )  # fmt: skip
            self.record(rate, load)
            growth.values.append(server.rss_mib() - before)
            growth.errors += load.errors
            growth.note = f"{before:.0f} → {server.rss_mib():.0f} MiB, peak {server.peak_rss_mib():.0f} MiB"
        with self.serve(self.embedded(data_dir)) as server:
            restart.values.append(server.rss_mib())
            client = Client(server.port)
            # Request n of keyed.lua, byte for byte, in the middle of the run (wrk builds one request
            # it never sends at start): its stored answer must come back.
            n = count // 2
            body = json.dumps(
                {"role": "user", "content": CONTENT, "metadata": {"client": "wrk", "lang": "en"}}, separators=(",", ":")
            ).encode()
            replay = client.call(
                "POST", f"/v1/sessions/k{n % c.sessions}/messages", body, {"Idempotency-Key": f"key-{n}"}
            )
            replayed = {k.lower(): v for k, v in replay.headers.items()}.get("idempotent-replayed") == "true"
            restart.note = f"key-{n} replayed after it" if replayed else f"**key-{n} not replayed** ({replay.status})"
            before = server.rss_mib()
            payload = json.dumps({"role": "user", "content": BIG_CONTENT}).encode()
            for i in range(200):
                answer = client.call("POST", "/v1/sessions/k0/messages", payload, {"Idempotency-Key": f"big-{i}"})
                if answer.status != 201:
                    raise RuntimeError(f"1 MiB keyed append: {answer.status} {answer.body[:200]!r}")
            big.values.append(server.rss_mib() - before)
            client.close()
        shutil.rmtree(data_dir)
        say(
            f"  growth {growth.values[-1]:.0f} MiB, after restart {restart.values[-1]:.0f} MiB, "
            f"200 keyed 1 MiB appends +{big.values[-1]:.0f} MiB"
        )

    # -- bigread --------------------------------------------------------

    def part_bigread(self) -> None:
        c = self.config
        r = self.results
        messages, readers = 200, 3
        peak = r.row(
            "big_peak",
            "bigread",
            f"peak RSS growth while {readers} clients read a {messages} x 1 MiB session (limit=1000, has_more)",
            "MiB",
            target="≤ 256 MiB",
            passes=lambda v: v <= 256,
        )
        appends = r.row(
            "big_append_p99",
            "bigread",
            "p99 of appends to that session meanwhile (8 connections)",
            "ms",
            target="≤ 200 ms",
            passes=lambda v: v <= 200,
        )
        say("bigread")
        source = self.build(
            self.fresh_dir("bigread"), [Seed("big0", messages=messages, content=BIG_CONTENT)], parallel=1
        )
        with self.serve(self.embedded(source)) as server:
            Client(server.port).get("/v1/sessions/big0")
            time.sleep(0.5)
            before = server.rss_mib()
            server.reset_peak_rss()
            finished = threading.Event()
            with ThreadPoolExecutor(readers + 1) as pool:
                load_future = pool.submit(
                    wrk, server.url, "append.lua", "big", "1", seconds=c.seconds, connections=8, threads=1,
                    pid=server.pid,
                )  # fmt: skip
                reads = [pool.submit(read_whole_session, server.port, "big0", finished) for _ in range(readers)]
                load = load_future.result()
                finished.set()
                passes = [future.result() for future in reads]
            peak_mib = server.peak_rss_mib()
        shutil.rmtree(source)
        peak.values.append(peak_mib - before)
        full = [p for p in passes if p.complete]
        pages = max((p.pages for p in passes), default=0)
        largest = max((p.largest for p in passes), default=0) / 2**20
        peak.note = (
            f"from {before:.0f} MiB; {sum(p.reads for p in passes)} whole reads in {c.seconds} s, "
            f"{pages} pages each, largest {largest:.1f} MiB"
        )
        if len(full) < readers:
            peak.note += f"; **{readers - len(full)} reader(s) finished no whole read**"
        appends.values.append(load.p99_ms)
        appends.errors += load.errors
        appends.note = f"{load.rate:,.0f} appends/s, p50 {load.p50_ms:.1f} ms"
        say(f"  peak growth {peak.values[-1]:.0f} MiB ({peak.note}), append p99 {load.p99_ms:.1f} ms")

    # -- memory ---------------------------------------------------------

    def part_memory(self) -> None:
        r = self.results
        count, length = 10_000, 30  # ~90 MB of messages: more than the 64 MiB cache
        ids = [f"m{i}" for i in range(count)]
        data_dir = self.build(self.root / "memory", [Seed(i, messages=length, per_append=length) for i in ids])
        # The defaults, whatever this shell's CHATSESSIONS_* say (the servers run without them).
        cache_sessions, cache_bytes = (Settings.model_fields[f].default for f in ("cache_sessions", "cache_bytes"))
        limits = f"cache_sessions={cache_sessions:,}, cache_bytes={cache_bytes // 2**20} MiB"
        start = r.row("rss_start", "memory", f"RSS after start, {count:,} sessions x {length} messages", "MiB")
        after_1k = r.row("rss_1k", "memory", f"RSS after reading 1,000 of them ({length} messages each)", "MiB")
        after_all = r.row(
            "rss_10k",
            "memory",
            f"RSS after reading all {count:,} ({limits}, the defaults)",
            "MiB",
            ratio_name="÷ after 1,000",
        )
        say("memory")
        with self.serve(self.embedded(data_dir)) as server:
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
                f"Store: {c.store}. Load: wrk, {c.threads} thread(s), {c.connections} connections, {c.seconds} s "
                f"per run after a {c.warmup} s warm-up; ~300-byte message bodies; {c.rounds} rounds "
                f"(keys, bigread, memory: one); parts {','.join(c.parts)}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
                f"took {minutes:.1f} min.{busy}",
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


@dataclass
class ReadPasses:
    reads: int = 0  # whole reads of the session, first page to has_more=false
    pages: int = 0  # pages of the last whole read
    largest: int = 0  # bytes of the largest page answered
    complete: bool = False


def read_whole_session(port: int, session_id: str, finished: threading.Event) -> ReadPasses:
    """Read every message of a session page by page (limit=1000, after the last seq) until
    has_more is false, again and again until `finished` is set.

    The body is searched, not parsed: json.loads of an 8 MiB page would hold the GIL and
    slow the other clients of this process."""
    client = Client(port)
    passes = ReadPasses()
    try:
        while not finished.is_set():
            after, pages = 0, 0
            while True:
                answer = client.get(f"/v1/sessions/{session_id}/messages?limit=1000&after={after}")
                pages += 1
                passes.largest = max(passes.largest, len(answer.body))
                at = answer.body.rfind(b'"seq":')
                if at < 0:
                    break
                after = int(answer.body[at + 6 : answer.body.index(b",", at)])
                if b'"has_more":true' not in answer.body[-64:]:
                    break
            passes.reads += 1
            passes.pages = pages
            passes.complete = True
    finally:
        client.close()
    return passes


def read_sessions(port: int, ids: list[str], length: int, *, parallel: int = 8) -> None:
    """GET every message of each session once (one page of `length`), on a few threads."""
    local = threading.local()

    def read(session_id: str) -> None:
        client: Client | None = getattr(local, "client", None)
        if client is None:
            client = local.client = Client(port, timeout=60)
        answer = client.get(f"/v1/sessions/{session_id}/messages?limit={length}")
        if len(answer.json()["items"]) != length:
            raise RuntimeError(f"GET messages of {session_id}: {answer.body[:200]!r}")

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
    say(f"store under test: {config.store}; parts: {', '.join(config.parts)}")
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
