"""Crash harness: SIGKILL the real server under load, restart it, check that nothing acknowledged is lost.

Each cycle drives 32 concurrent clients against 16 sessions (appends, batches,
patches, clears, delete + re-create, reads), kills the server at a random
moment, restarts it on the same data directory and checks every session
against a model built only from the answers the clients received:

- every append that got a 2xx is present exactly once, at the seq it was
  given, unless an acknowledged clear (or a clear still in flight at the kill)
  came after it; a cleared message never comes back;
- seqs are contiguous, and one append acknowledged before another was sent has
  the smaller seq (acknowledged order);
- every session loads: GET and a full walk of its messages answer 200, never 5xx;
- no *.tmp file is left once the restarted server answers /healthz.

Requests still in flight at the kill have an unknown outcome: either is fine.
After the check the model is rebased on what the server holds.

`make crash` runs `python -m tests.crash.harness --cycles $(CYCLES)`;
`tests/crash/test_crash.py` runs 10 short cycles in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatsessions.config import Settings
from chatsessions.storage.sqlite import SqliteSessionRepository
from tests.crash.server import Server, ServerFailed, start_server

SESSIONS = 16
CLIENTS = 32
KILL_WINDOW = (0.05, 2.0)
# A small WAL limit (SQLite checkpoints every 128 pages) so that checkpoints run
# during the load and the kill can land inside one.
SERVER_ENV = {"CHATSESSIONS_WAL_SEGMENT_BYTES": str(512 * 1024)}


class SharedExclusiveLock:
    """Appends, patches and clears share a session; delete + re-create takes it alone.

    Without it, an append racing a delete and a re-create could land in either
    incarnation of the id, and the model could not say which one it belongs to.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(slots=True)
class AckedMessage:
    content: str
    seq: int
    version: int  # session version of the append; 0 for messages inherited from the last check
    sent: float
    acked: float


@dataclass
class SessionModel:
    """What the clients know about one session id from the answers they got."""

    sid: str
    exists: bool = False
    appends: list[AckedMessage] = field(default_factory=list)
    clears: list[int] = field(default_factory=list)  # versions of acknowledged clears
    patches: list[tuple[int, str]] = field(default_factory=list)  # (version, title) acknowledged
    max_version: int = 0
    inflight: Counter[str] = field(default_factory=Counter)
    lock: SharedExclusiveLock = field(default_factory=SharedExclusiveLock)

    def reset(self, *, exists: bool) -> None:
        self.exists = exists
        self.appends = []
        self.clears = []
        self.patches = []
        self.max_version = 1 if exists else 0

    def saw(self, version: int) -> None:
        self.max_version = max(self.max_version, version)


@dataclass
class Totals:
    cycles: int = 0
    acknowledged: int = 0  # messages whose append got a 2xx
    lost: int = 0
    unreadable: int = 0
    ops: Counter[str] = field(default_factory=Counter)  # acknowledged operations by kind
    recovery: list[float] = field(default_factory=list)  # process start -> /healthz after a kill
    empty_start: float = 0.0  # the same on an empty data directory: interpreter and imports
    store_recovery: list[float] = field(default_factory=list)  # SqliteSessionRepository.open alone, same data
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.unreadable == 0 and not self.problems

    def summary(self) -> str:
        return (
            f"crash: {self.cycles} cycles, {self.acknowledged} acknowledged, "
            f"{self.lost} lost, {self.unreadable} unreadable"
        )

    def details(self) -> str:
        lines = []
        if self.recovery:
            lines.append(
                f"recovery (process start -> /healthz after SIGKILL): median {statistics.median(self.recovery):.2f} s, "
                f"max {max(self.recovery):.2f} s over {len(self.recovery)} restarts "
                f"(an empty data dir: {self.empty_start:.2f} s)"
            )
        if self.store_recovery:
            lines.append(
                f"recovery inside the store (SQLite's WAL recovery, schema check): median "
                f"{statistics.median(self.store_recovery) * 1000:.0f} ms, max {max(self.store_recovery) * 1000:.0f} ms"
            )
        lines.append("acknowledged operations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())))
        lines.extend(f"PROBLEM: {p}" for p in self.problems[:50])
        if len(self.problems) > 50:
            lines.append(f"... and {len(self.problems) - 50} more problems")
        return "\n".join(lines)


def etag_version(response: httpx.Response) -> int:
    return int(response.headers["etag"].strip('"'))


class Workload:
    """The load of one cycle: CLIENTS workers until the server dies."""

    def __init__(self, models: list[SessionModel], totals: Totals, rng: random.Random, cycle: int) -> None:
        self.models = models
        self.totals = totals
        self.rng = rng
        self.cycle = cycle
        self.counter = 0

    def content(self, worker: int) -> str:
        self.counter += 1
        size = self.rng.randint(2048, 16384) if self.rng.random() < 0.2 else self.rng.randint(20, 300)
        tag = f"c{self.cycle}-w{worker}-n{self.counter}|"
        return tag + "x" * max(0, size - len(tag))

    def unexpected(self, what: str, response: httpx.Response) -> None:
        self.totals.problems.append(
            f"cycle {self.cycle}: {what} answered {response.status_code} during the load: {response.text[:300]}"
        )

    async def run(self, base_url: str, stop: asyncio.Event) -> None:
        async def worker(number: int) -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=30.0, verify=False) as client:
                while not stop.is_set():
                    try:
                        await self.step(client, number)
                    except httpx.TransportError:
                        return  # the server is gone; what was in flight stays unknown

        await asyncio.gather(*(worker(n) for n in range(CLIENTS)))

    async def step(self, client: httpx.AsyncClient, worker: int) -> None:
        model = self.rng.choice(self.models)
        roll = self.rng.random()
        if not model.exists or roll < 0.015:
            async with model.lock.exclusive():
                if roll < 0.015 or not model.exists:  # another worker may have re-created it meanwhile
                    await self.recreate(client, model)
            return
        async with model.lock.shared():
            if not model.exists:
                return
            if roll < 0.62:
                await self.append(client, model, [self.content(worker)])
            elif roll < 0.72:
                await self.append(client, model, [self.content(worker) for _ in range(self.rng.randint(2, 6))])
            elif roll < 0.78:
                await self.patch(client, model, worker)
            elif roll < 0.81:
                await self.clear(client, model)
            else:
                await self.read(client, model)

    async def append(self, client: httpx.AsyncClient, model: SessionModel, contents: list[str]) -> None:
        single = len(contents) == 1
        path = f"/v1/sessions/{model.sid}/messages" + ("" if single else "/batch")
        body: dict[str, Any] = (
            {"role": "user", "content": contents[0]}
            if single
            else {"messages": [{"role": "assistant", "content": c} for c in contents]}
        )
        model.inflight["append"] += 1
        sent = time.perf_counter()
        response = await client.post(path, json=body)
        acked = time.perf_counter()
        model.inflight["append"] -= 1
        if response.status_code != 201:
            self.unexpected(f"append to {model.sid}", response)
            return
        version = etag_version(response)
        items = [response.json()] if single else response.json()["items"]
        for content, item in zip(contents, items, strict=True):
            if item["content"] != content:
                self.totals.problems.append(f"cycle {self.cycle}: append to {model.sid} echoed other content")
            model.appends.append(AckedMessage(content, item["seq"], version, sent, acked))
        model.saw(version)
        self.totals.acknowledged += len(contents)
        self.totals.ops["append" if single else "batch"] += 1

    async def patch(self, client: httpx.AsyncClient, model: SessionModel, worker: int) -> None:
        title = f"t{self.cycle}-{worker}-{self.rng.getrandbits(32)}"
        model.inflight["patch"] += 1
        response = await client.patch(f"/v1/sessions/{model.sid}", json={"title": title})
        model.inflight["patch"] -= 1
        if response.status_code != 200:
            self.unexpected(f"patch of {model.sid}", response)
            return
        version = response.json()["version"]
        model.patches.append((version, title))
        model.saw(version)
        self.totals.ops["patch"] += 1

    async def clear(self, client: httpx.AsyncClient, model: SessionModel) -> None:
        model.inflight["clear"] += 1
        response = await client.delete(f"/v1/sessions/{model.sid}/messages")
        model.inflight["clear"] -= 1
        if response.status_code != 204:
            self.unexpected(f"clear of {model.sid}", response)
            return
        version = etag_version(response)
        model.clears.append(version)
        model.saw(version)
        self.totals.ops["clear"] += 1

    async def recreate(self, client: httpx.AsyncClient, model: SessionModel) -> None:
        """Delete the session (if it exists) and create it again under the same id."""
        if model.exists:
            model.inflight["delete"] += 1
            response = await client.delete(f"/v1/sessions/{model.sid}")
            model.inflight["delete"] -= 1
            if response.status_code != 204:
                self.unexpected(f"delete of {model.sid}", response)
                return
            model.reset(exists=False)
            self.totals.ops["delete"] += 1
        model.inflight["create"] += 1
        response = await client.post("/v1/sessions", json={"id": model.sid, "metadata": {"cycle": self.cycle}})
        model.inflight["create"] -= 1
        if response.status_code != 201:
            self.unexpected(f"create of {model.sid}", response)
            return
        model.reset(exists=True)
        self.totals.ops["create"] += 1

    async def read(self, client: httpx.AsyncClient, model: SessionModel) -> None:
        if self.rng.random() < 0.5:
            params: dict[str, str | int] = {"order": "desc", "limit": self.rng.randint(1, 50)}
        else:
            newest = max((a.seq for a in model.appends), default=0)
            params = {"after": self.rng.randint(0, newest), "limit": self.rng.randint(1, 20)}
        response = await client.get(f"/v1/sessions/{model.sid}/messages", params=params)
        if response.status_code != 200:
            self.unexpected(f"read of {model.sid} {params}", response)


@dataclass
class Verdict:
    lost: int = 0
    unreadable: bool = False
    problems: list[str] = field(default_factory=list)


async def read_all_messages(client: httpx.AsyncClient, sid: str) -> list[dict[str, Any]] | httpx.Response:
    """Walk the whole history in pages; a non-200 page is returned as is."""
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await client.get(f"/v1/sessions/{sid}/messages", params={"after": after, "limit": 97})
        if response.status_code != 200:
            return response
        page = response.json()
        found.extend(page["items"])
        if not page["has_more"]:
            return found
        after = page["items"][-1]["seq"]


def check_order(model: SessionModel) -> list[str]:
    """An append acknowledged before another was sent has the smaller seq."""
    by_ack = sorted(model.appends, key=lambda a: a.acked)
    highest = 0
    i = 0
    problems = []
    for message in sorted(model.appends, key=lambda a: a.sent):
        while i < len(by_ack) and by_ack[i].acked < message.sent:
            highest = max(highest, by_ack[i].seq)
            i += 1
        if message.seq <= highest:
            problems.append(f"{model.sid}: seq {message.seq} was acknowledged after seq {highest} yet comes first")
    return problems


async def verify_session(client: httpx.AsyncClient, model: SessionModel) -> Verdict:
    """Check one session after a restart against the model, then rebase the model on what is there."""
    verdict = Verdict()
    sid = model.sid
    cutoff = max(model.clears, default=0)
    required = [a for a in model.appends if a.version > cutoff]
    response = await client.get(f"/v1/sessions/{sid}")
    if response.status_code >= 500:
        verdict.unreadable = True
        verdict.problems.append(f"{sid}: GET answered {response.status_code}: {response.text[:300]}")
        return verdict
    if response.status_code == 404:
        if model.exists and not model.inflight["delete"]:
            verdict.lost = len(required)
            verdict.problems.append(f"{sid}: the session is gone; {len(required)} acknowledged messages with it")
        model.reset(exists=False)
        return verdict
    if response.status_code != 200:
        verdict.problems.append(f"{sid}: GET answered {response.status_code}")
        return verdict
    session = response.json()
    if not model.exists and not model.inflight["create"]:
        verdict.problems.append(f"{sid}: an acknowledged delete did not stick")
    walked = await read_all_messages(client, sid)
    if isinstance(walked, httpx.Response):
        verdict.unreadable = True
        verdict.problems.append(f"{sid}: paging answered {walked.status_code}: {walked.text[:300]}")
        return verdict
    seqs = [m["seq"] for m in walked]
    if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        verdict.problems.append(f"{sid}: seqs are not contiguous: {seqs[:20]}...")
    present = {m["content"]: m for m in walked}
    if len(present) != len(walked):
        verdict.problems.append(f"{sid}: a message is present twice")
    if session["message_count"] != len(walked) or (seqs and session["last_seq"] != seqs[-1]):
        verdict.problems.append(f"{sid}: counters {session['message_count']}/{session['last_seq']} disagree")
    if session["version"] < model.max_version:
        verdict.problems.append(f"{sid}: version {session['version']} is behind acknowledged {model.max_version}")
    for acked in model.appends:
        message = present.get(acked.content)
        if message is None:
            continue
        if acked.version < cutoff:
            verdict.problems.append(f"{sid}: seq {acked.seq} came back after an acknowledged clear")
        if message["seq"] != acked.seq:
            verdict.problems.append(f"{sid}: acknowledged seq {acked.seq} is now at seq {message['seq']}")
    missing = [a for a in required if a.content not in present]
    if model.inflight["clear"] and missing:
        # A clear in flight may have cut any prefix: only a gap inside what survived is a loss.
        kept = [a.version for a in required if a.content in present]
        missing = [a for a in missing if kept and a.version > min(kept)]
    if missing:
        verdict.lost = len(missing)
        verdict.problems.append(
            f"{sid}: {len(missing)} acknowledged messages missing, first seq {missing[0].seq} (version "
            f"{missing[0].version}; session version {session['version']}, first live {seqs[0] if seqs else None})"
        )
    if model.patches and not model.inflight["patch"]:
        expected_title = max(model.patches)[1]
        if session["title"] != expected_title:
            verdict.problems.append(f"{sid}: title {session['title']!r}, acknowledged {expected_title!r}")
    verdict.problems.extend(check_order(model))
    # Rebase: what is there now is the history the next cycle builds on.
    model.reset(exists=True)
    model.max_version = session["version"]
    now = time.perf_counter()
    model.appends = [AckedMessage(m["content"], m["seq"], 0, now, now) for m in walked]
    model.inflight.clear()
    return verdict


async def time_store_recovery(data_dir: Path, probe: Path) -> float:
    """How long the store itself takes to recover what the kill left, on a copy (no interpreter start-up)."""
    await asyncio.to_thread(shutil.copytree, data_dir, probe)
    settings = Settings.model_validate(
        {"store": "sqlite", "data_dir": probe, "wal_segment_bytes": SERVER_ENV["CHATSESSIONS_WAL_SEGMENT_BYTES"]}
    )
    started = time.perf_counter()
    repo = await SqliteSessionRepository.open(settings)
    await repo.check_ready()  # a write goes through: recovery is done, not merely started
    elapsed = time.perf_counter() - started
    await repo.aclose()
    await asyncio.to_thread(shutil.rmtree, probe)
    return elapsed


def temp_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.rglob("*.tmp"))


async def run_cycles(
    *,
    cycles: int,
    work_dir: Path,
    kill_window: tuple[float, float] = KILL_WINDOW,
    seed: int | None = None,
    progress: bool = False,
) -> Totals:
    """Run `cycles` kill/restart cycles on one data directory under `work_dir`."""
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    data_dir = work_dir / "data"
    log_path = work_dir / "server.log"
    totals = Totals()
    models = [SessionModel(f"crash-{n:02d}") for n in range(SESSIONS)]
    first = await start_server(data_dir, log_path, env=SERVER_ENV)
    totals.empty_start = first.start_seconds
    server: Server | None = first
    try:
        for cycle in range(1, cycles + 1):
            assert server is not None
            stop = asyncio.Event()
            workload = Workload(models, totals, rng, cycle)
            load = asyncio.create_task(workload.run(server.base_url, stop))
            await asyncio.sleep(rng.uniform(*kill_window))
            await server.kill()
            stop.set()
            await load
            server = None
            totals.store_recovery.append(await time_store_recovery(data_dir, work_dir / "recovery-probe"))
            try:
                server = await start_server(data_dir, log_path, env=SERVER_ENV)
            except ServerFailed as exc:
                totals.unreadable += len(models)
                totals.problems.append(f"cycle {cycle}: the server did not come back (seed {seed}): {exc}")
                break
            totals.recovery.append(server.start_seconds)
            leftovers = temp_files(data_dir)
            if leftovers:
                totals.problems.append(f"cycle {cycle}: temp files left after recovery: {leftovers}")
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0, verify=False) as client:
                for model in models:
                    verdict = await verify_session(client, model)
                    totals.lost += verdict.lost
                    totals.unreadable += verdict.unreadable
                    totals.problems.extend(f"cycle {cycle}: {p}" for p in verdict.problems)
            totals.cycles = cycle
            if progress:
                print(f"  cycle {cycle}: {totals.summary()} ({server.start_seconds:.2f} s to /healthz)", flush=True)
            if totals.problems:
                totals.problems.append(f"(seed {seed}, data dir {data_dir}, server log {log_path})")
                break
    finally:
        if server is not None:
            await server.stop()
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-kill-ms", type=int, default=int(KILL_WINDOW[0] * 1000))
    parser.add_argument("--max-kill-ms", type=int, default=int(KILL_WINDOW[1] * 1000))
    parser.add_argument("--keep", action="store_true", help="keep the data directory and server log")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("chatsessions").setLevel(logging.CRITICAL)  # the recovery probe's own log
    work_dir = Path(tempfile.mkdtemp(prefix="chatsessions-crash-"))
    print(f"crash harness: {args.cycles} cycles in {work_dir}", flush=True)
    totals = asyncio.run(
        run_cycles(
            cycles=args.cycles,
            work_dir=work_dir,
            kill_window=(args.min_kill_ms / 1000, args.max_kill_ms / 1000),
            seed=args.seed,
            progress=not args.quiet,
        )
    )
    print(totals.details())
    print(totals.summary(), flush=True)
    if totals.ok and not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if totals.ok else 1


if __name__ == "__main__":
    sys.exit(main())
