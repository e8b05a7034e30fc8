"""Power loss under the SQLite store, through SQLite's own seam (`chatsessions.storage.sqlite.testvfs`).

`SCRIPT` is a short workload: creates, appends, batches, a patch, clears,
a delete and re-create of an id, keyed appends (Idempotency-Key answers
stored with their change), checkpoints forced by a small WAL, and a clean
restart in the middle. It runs on the real `SqliteSessionRepository`, opened
on a `FaultyVFS` that numbers every xWrite, xSync, xTruncate and xDelete.
With a crash at call n, call n never happens and nothing after it reaches the
disk; the script stops at the first step that fails.

Then two images are recovered with the real repository and the default VFS:

- the power-loss image: only what a completed sync covered (or, in
  `make crash`, also a random subset of the unsynced writes, some torn);
- the kill -9 image: the live directory as the process left it.

In each, every acknowledged step must be there, the step in flight at the
cut must be there whole or not at all (a keyed append's stored answer with
it), the database must pass `PRAGMA integrity_check`, and the store must take
a write. `make test` runs every crash point of the script once
(`tests/crash/test_power_loss.py`); `make crash` runs `POWERLOSS_ITERATIONS`
random ones (`python -m tests.crash.powerloss`).

A second workload has concurrent writers append to a few sessions, so that
the writer commits them in groups, and is cut at random calls: every
acknowledged append must be there exactly once at its seq, seqs contiguous,
and nothing there that was never sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import apsw
from pydantic_core import to_json

from chatsessions.config import Settings
from chatsessions.errors import ChatSessionsError
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Role,
    Session,
    SessionCreate,
    SessionPatch,
    StoredResponse,
)
from chatsessions.storage.sqlite import SqliteSessionRepository
from chatsessions.storage.sqlite.testvfs import FaultyVFS

TENANT = "default"
# A checkpoint every 4 pages of WAL: the script's bigger batches run several, and WAL restarts.
WAL_SEGMENT_BYTES = 4 * 4096
STEP_TIMEOUT = 10.0
# What a step may raise when the power goes: a domain error, or SQLite's own at open.
FAILURES = (ChatSessionsError, apsw.Error, OSError, TimeoutError)


@dataclass(frozen=True)
class Step:
    kind: str  # create, append, patch, clear, delete, keyed, restart
    sid: str = ""
    contents: tuple[str, ...] = ()
    title: str | None = None
    key: str = ""


@dataclass(frozen=True)
class SessionState:
    version: int
    last_seq: int
    title: str | None
    messages: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class State:
    sessions: dict[str, SessionState] = field(default_factory=dict)
    answers: frozenset[str] = frozenset()  # Idempotency-Keys with a stored answer


def _text(tag: str, size: int = 40) -> str:
    return (tag + "|" + "x" * size)[: max(size, len(tag) + 1)]


SCRIPT: list[Step] = [
    Step("create", "a", title="A"),
    Step("append", "a", (_text("a1"),)),
    Step("append", "a", (_text("a2"), _text("a3"), _text("a4"))),
    Step("create", "b"),
    Step("append", "b", (_text("b1"),)),
    Step("patch", "a", title="A2"),
    Step("append", "b", tuple(_text(f"big{i}", 3000) for i in range(5))),  # over the WAL limit: a checkpoint
    Step("keyed", "a", (_text("a5"),), key="k1"),
    Step("clear", "b"),
    Step("create", "c"),
    Step("append", "c", (_text("c1"), _text("c2"))),
    Step("delete", "c"),
    Step("create", "c", title="again"),  # the same id again: seqs restart
    Step("restart"),  # a clean close (checkpoint, the WAL removed) and an open
    Step("keyed", "c", (_text("c5", 2000), _text("c6", 2000)), key="k2"),
    Step("clear", "a"),
    Step("append", "a", (_text("a7"),)),
    Step("delete", "b"),
    Step("patch", "c", title="C"),
    Step("create", "d"),
    Step("keyed", "d", (_text("d1"),), key="k3"),
]
SESSION_IDS = sorted({step.sid for step in SCRIPT if step.sid})
KEYS = sorted({step.key for step in SCRIPT if step.key})
# Erasure: a clear or a delete of a session drops the stored answers that may hold its content.
KEY_SESSION = {step.key: step.sid for step in SCRIPT if step.key}


def apply(state: State, step: Step) -> State:
    """The state a client may expect once `step` is acknowledged."""
    sessions = dict(state.sessions)
    answers = state.answers
    current = sessions.get(step.sid)
    if step.kind in ("clear", "delete"):
        answers = frozenset(key for key in answers if KEY_SESSION[key] != step.sid)
    if step.kind == "create":
        sessions[step.sid] = SessionState(1, 0, step.title, ())
    elif step.kind == "delete":
        del sessions[step.sid]
    elif step.kind != "restart":
        assert current is not None, step
        bumped = replace(current, version=current.version + 1)
        if step.kind in ("append", "keyed"):
            added = tuple((current.last_seq + 1 + i, text) for i, text in enumerate(step.contents))
            bumped = replace(bumped, last_seq=current.last_seq + len(added), messages=current.messages + added)
            if step.kind == "keyed":
                answers = answers | {step.key}
        elif step.kind == "patch":
            bumped = replace(bumped, title=step.title)
        elif step.kind == "clear":
            bumped = replace(bumped, messages=())
        sessions[step.sid] = bumped
    return State(sessions, answers)


def fingerprint(key: str) -> str:
    return f"fingerprint-of-{key}"


def render(session: Session, messages: list[Message]) -> StoredResponse:
    body = to_json({"version": session.version, "seqs": [m.seq for m in messages]})
    return StoredResponse(201, body, {"content-type": "application/json"})


async def perform(repo: SqliteSessionRepository, step: Step) -> None:
    if step.kind == "create":
        await repo.create_session(TENANT, SessionCreate(id=step.sid, title=step.title))
    elif step.kind in ("append", "keyed"):
        messages = [MessageCreate(role=Role.user, content=c) for c in step.contents]
        idempotency = None
        if step.kind == "keyed":
            assert await repo.idempotency_begin(TENANT, step.key, fingerprint(step.key)) is None
            idempotency = IdempotencyRequest(step.key, fingerprint(step.key), render)
        await repo.append_messages(TENANT, step.sid, messages, idempotency=idempotency)
    elif step.kind == "patch":
        await repo.patch_session(TENANT, step.sid, SessionPatch(title=step.title))
    elif step.kind == "clear":
        await repo.clear_messages(TENANT, step.sid)
    elif step.kind == "delete":
        await repo.delete_session(TENANT, step.sid)
    else:
        raise AssertionError(step)


async def observe(repo: SqliteSessionRepository) -> State:
    """Every session and key of the script as the repository serves it (raises if one cannot be read)."""
    sessions: dict[str, SessionState] = {}
    for sid in SESSION_IDS:
        session = await repo.get_session(TENANT, sid)
        if session is None:
            continue
        items, more = await repo.list_messages(TENANT, sid, MessageQuery(limit=1000))
        assert not more
        sessions[sid] = SessionState(
            session.version, session.last_seq, session.title, tuple((m.seq, m.text) for m in items)
        )
    answers = set()
    for key in KEYS:
        if await repo.idempotency_begin(TENANT, key, fingerprint(key)) is not None:
            answers.add(key)
        else:
            await repo.idempotency_finish(TENANT, key, None)  # release the claim the lookup took
    return State(sessions, frozenset(answers))


def settings_for(data_dir: Path, *, fsync: str = "always") -> Settings:
    return Settings.model_validate(
        {"store": "sqlite", "data_dir": data_dir, "fsync": fsync, "wal_segment_bytes": WAL_SEGMENT_BYTES}
    )


async def abandon(repo: SqliteSessionRepository) -> None:
    """What is left of a process whose disk went away: release its files and lock, write nothing."""
    with contextlib.suppress(*FAILURES):
        await asyncio.wait_for(repo.aclose(), STEP_TIMEOUT)


@dataclass
class Run:
    """One run of SCRIPT with a crash at call `crash_at` (None: no crash)."""

    live: Path
    vfs: FaultyVFS
    allowed: list[State] = field(default_factory=list)  # what recovery may show
    acked: int = 0  # steps acknowledged


async def run_script(work: Path, vfs: FaultyVFS, *, fsync: str = "always") -> Run:
    live = work / "live"
    settings = settings_for(live, fsync=fsync)
    run = Run(live, vfs)
    state = State()
    inflight: Step | None = None
    repo: SqliteSessionRepository | None = None
    try:
        repo = await asyncio.wait_for(SqliteSessionRepository.open(settings, vfs=vfs.vfs_name), STEP_TIMEOUT)
        for step in SCRIPT:
            try:
                if step.kind == "restart":
                    await asyncio.wait_for(repo.aclose(), STEP_TIMEOUT)
                    repo = None
                    repo = await asyncio.wait_for(
                        SqliteSessionRepository.open(settings, vfs=vfs.vfs_name), STEP_TIMEOUT
                    )
                else:
                    await asyncio.wait_for(perform(repo, step), STEP_TIMEOUT)
            except FAILURES:
                if not vfs.crashed:
                    raise  # a step that fails with the disk still on is a bug, not a crash
                inflight = step
                break
            state = apply(state, step)
            run.acked += 1
    except FAILURES:
        if not vfs.crashed:
            raise
    finally:
        if repo is not None:
            await abandon(repo)
    run.allowed = [state] if inflight is None else [state, apply(state, inflight)]
    return run


def _brief(state: SessionState | None) -> str:
    if state is None:
        return "absent"
    tags = [f"{seq}:{text.split('|')[0]}" for seq, text in state.messages]
    return f"version {state.version}, last_seq {state.last_seq}, title {state.title!r}, messages {tags}"


def describe(seen: State, allowed: list[State]) -> str:
    lines = ["recovered state is none of the allowed ones"]
    for sid in SESSION_IDS:
        options = {_brief(option.sessions.get(sid)) for option in allowed}
        if _brief(seen.sessions.get(sid)) not in options:
            lines.append(f"  {sid}: got {_brief(seen.sessions.get(sid))}")
            lines.extend(f"  {sid}: allowed {option}" for option in sorted(options))
    options = {repr(sorted(option.answers)) for option in allowed}
    if repr(sorted(seen.answers)) not in options:
        lines.append(f"  stored answers: got {sorted(seen.answers)}, allowed {sorted(options)}")
    return "\n".join(lines)


async def check_image(image: Path, allowed: list[State], label: str) -> list[str]:
    """Recover `image` with the real repository (default VFS) and compare it with what may be there."""
    try:
        repo = await SqliteSessionRepository.open(settings_for(image))
    except Exception as exc:
        return [f"{label}: recovery failed: {exc!r}"]
    problems: list[str] = []
    try:
        broken = await repo.integrity_check()
        if broken:
            problems.append(f"{label}: integrity_check: {broken[:5]}")
        seen = await observe(repo)
        if seen not in allowed:
            problems.append(f"{label}: {describe(seen, allowed)}")
        # Writable after recovery: a new session and an append to it.
        await repo.create_session(TENANT, SessionCreate(id="after-recovery"))
        await repo.append_messages(TENANT, "after-recovery", [MessageCreate(role=Role.user, content="ok")])
    except ChatSessionsError as exc:
        problems.append(f"{label}: the recovered store failed: {exc!r}")
    finally:
        await repo.aclose()
    return problems


@dataclass
class Outcome:
    crash_at: int | None
    calls: int
    acked: int
    problems: list[str]
    trace: list[str]


async def crash_once(
    work: Path,
    crash_at: int | None,
    *,
    torn: random.Random | None = None,
    fsync: bool = True,
) -> Outcome:
    """Run SCRIPT with a crash at `crash_at`, then check the power-loss image and the kill -9 image.

    `fsync=False` runs the store with fsync=never, whose commits no sync covers (a negative control).
    """
    with FaultyVFS(root=work / "live", crash_at=crash_at) as vfs:
        run = await run_script(work, vfs, fsync="always" if fsync else "never")
        vfs.cut_power()  # a crash point past the last call: the power goes once the script is done
        label = f"crash at call {crash_at} ({vfs.crash_call})"
        power = work / "power"
        vfs.materialise(power, rng=torn)
        problems = await check_image(power, run.allowed, f"{label}, power loss{' (random unsynced)' if torn else ''}")
        killed = work / "killed"
        shutil.copytree(run.live, killed)
        problems += await check_image(killed, run.allowed, f"{label}, kill -9")
        return Outcome(crash_at, vfs.calls, run.acked, problems, list(vfs.trace))


async def dry_run(work: Path) -> Outcome:
    """Run SCRIPT once without a crash: its trace lists the crash points."""
    outcome = await crash_once(work, None)
    if outcome.problems:
        raise AssertionError("\n".join(outcome.problems))
    if outcome.acked != len(SCRIPT):
        raise AssertionError(f"the script stopped after {outcome.acked} of {len(SCRIPT)} steps without a crash")
    return outcome


def scratch_parent() -> str | None:
    """A RAM-backed directory when there is one: each crash point creates and deletes a few databases."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass
class Totals:
    points: int = 0  # crash points of the script
    runs: int = 0
    acked: int = 0  # steps acknowledged before the cuts, over all runs
    problems: list[str] = field(default_factory=list)


async def random_iterations(iterations: int, seed: int, progress: bool = False) -> Totals:
    """`iterations` runs at random crash points, half of them keeping a random subset of unsynced writes."""
    rng = random.Random(seed)
    totals = Totals()
    with tempfile.TemporaryDirectory(prefix="chatsessions-powerloss-", dir=scratch_parent()) as tmp:
        totals.points = (await dry_run(Path(tmp) / "dry")).calls
        for n in range(iterations):
            work = Path(tmp) / str(n)
            point = rng.randrange(totals.points + 1)
            outcome = await crash_once(work, point, torn=random.Random(rng.getrandbits(32)) if n % 2 else None)
            totals.runs += 1
            totals.acked += outcome.acked
            totals.problems += outcome.problems
            shutil.rmtree(work)
            if progress and (n + 1) % 100 == 0:
                print(f"  power loss: {n + 1}/{iterations} iterations, {len(totals.problems)} problems", flush=True)
    return totals


# --- concurrent appends: group commits cut by the power ---------------------

CONCURRENT_SESSIONS = 4
CONCURRENT_WRITERS = 8
APPENDS_PER_WRITER = 12


@dataclass
class ConcurrentRun:
    created: list[str] = field(default_factory=list)  # sessions whose create was acknowledged
    acked: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # session -> (seq, content) acknowledged
    sent: set[str] = field(default_factory=set)  # every content sent, acknowledged or not


async def run_concurrent(live: Path, vfs: FaultyVFS, rng: random.Random) -> ConcurrentRun:
    """CONCURRENT_WRITERS tasks append to CONCURRENT_SESSIONS sessions at once: the writer batches them."""
    run = ConcurrentRun()
    repo: SqliteSessionRepository | None = None
    try:
        repo = await asyncio.wait_for(SqliteSessionRepository.open(settings_for(live), vfs=vfs.vfs_name), STEP_TIMEOUT)
        for n in range(CONCURRENT_SESSIONS):
            sid = f"p{n}"
            await repo.create_session(TENANT, SessionCreate(id=sid))
            run.created.append(sid)
            run.acked[sid] = []

        async def writer(number: int) -> None:
            assert repo is not None
            for n in range(APPENDS_PER_WRITER):
                sid = run.created[(number + n) % len(run.created)]
                content = f"w{number}-n{n}|" + "v" * rng.choice((10, 300, 2500))
                run.sent.add(content)
                try:
                    _, added = await asyncio.wait_for(
                        repo.append_messages(TENANT, sid, [MessageCreate(role=Role.user, content=content)]),
                        STEP_TIMEOUT,
                    )
                except FAILURES:
                    if not vfs.crashed:
                        raise
                    return
                run.acked[sid].append((added[0].seq, content))
                if rng.random() < 0.3:
                    await asyncio.sleep(0)

        await asyncio.gather(*(writer(n) for n in range(CONCURRENT_WRITERS)))
    except FAILURES:
        if not vfs.crashed:
            raise
    finally:
        if repo is not None:
            await abandon(repo)
    return run


async def check_concurrent_image(image: Path, run: ConcurrentRun, label: str) -> list[str]:
    """Every acknowledged append at its seq, exactly once; seqs contiguous; nothing that was never sent."""
    try:
        repo = await SqliteSessionRepository.open(settings_for(image))
    except Exception as exc:
        return [f"{label}: recovery failed: {exc!r}"]
    problems: list[str] = []
    try:
        broken = await repo.integrity_check()
        if broken:
            problems.append(f"{label}: integrity_check: {broken[:5]}")
        for sid in run.created:
            session = await repo.get_session(TENANT, sid)
            if session is None:
                problems.append(f"{label}: acknowledged session {sid} is gone")
                continue
            items, _ = await repo.list_messages(TENANT, sid, MessageQuery(limit=1000))
            found = {m.text: m.seq for m in items}
            if [m.seq for m in items] != list(range(1, len(items) + 1)) or session.last_seq != len(items):
                problems.append(f"{label}: {sid}: seqs {[m.seq for m in items]}, last_seq {session.last_seq}")
            if len(found) != len(items):
                problems.append(f"{label}: {sid}: a message is there twice")
            lost = [(seq, text[:12]) for seq, text in run.acked[sid] if found.get(text) != seq]
            if lost:
                problems.append(f"{label}: {sid}: acknowledged appends missing or moved: {lost[:5]}")
            strangers = [text[:12] for text in found if text not in run.sent]
            if strangers:
                problems.append(f"{label}: {sid}: messages nobody sent: {strangers[:5]}")
    except ChatSessionsError as exc:
        problems.append(f"{label}: the recovered store failed: {exc!r}")
    finally:
        await repo.aclose()
    return problems


async def concurrent_once(
    work: Path, crash_at: int | None, rng: random.Random, *, torn: bool
) -> tuple[int, int, list[str]]:
    """One concurrent run cut at `crash_at`; returns (calls, acknowledged appends, problems)."""
    with FaultyVFS(root=work / "live", crash_at=crash_at) as vfs:
        run = await run_concurrent(work / "live", vfs, rng)
        vfs.cut_power()
        label = f"concurrent, crash at call {crash_at} ({vfs.crash_call})"
        vfs.materialise(work / "power", rng=rng if torn else None)
        problems = await check_concurrent_image(work / "power", run, f"{label}, power loss")
        shutil.copytree(work / "live", work / "killed")
        problems += await check_concurrent_image(work / "killed", run, f"{label}, kill -9")
        return vfs.calls, sum(len(a) for a in run.acked.values()), problems


async def random_concurrent(iterations: int, seed: int) -> Totals:
    """`iterations` concurrent runs, each cut at a random call of what a run without a cut makes."""
    rng = random.Random(seed)
    totals = Totals()
    with tempfile.TemporaryDirectory(prefix="chatsessions-powerloss-", dir=scratch_parent()) as tmp:
        totals.points, _, problems = await concurrent_once(Path(tmp) / "dry", None, rng, torn=False)
        totals.problems += problems
        for n in range(iterations):
            work = Path(tmp) / str(n)
            _, acked, problems = await concurrent_once(work, rng.randrange(totals.points + 1), rng, torn=n % 2 == 1)
            totals.runs += 1
            totals.acked += acked
            totals.problems += problems
            shutil.rmtree(work)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Power-loss simulation at random crash points.")
    parser.add_argument(
        "--iterations", type=int, default=int(os.environ.get("POWERLOSS_ITERATIONS", "1000")), help="default 1000"
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the store logs every simulated failure; the summary is what counts
    seed = random.randrange(2**32) if args.seed is None else args.seed
    totals = asyncio.run(random_iterations(args.iterations, seed, progress=True))
    concurrent = asyncio.run(random_concurrent(max(1, args.iterations // 4), seed))
    for problem in (totals.problems + concurrent.problems)[:20]:
        print(f"PROBLEM: {problem}")
    print(
        f"power loss: {totals.runs} random crash points of {totals.points} (seed {seed}), "
        f"{totals.acked} acknowledged steps, {len(totals.problems)} problems; "
        f"concurrent appends: {concurrent.runs} cuts of about {concurrent.points} calls, "
        f"{concurrent.acked} acknowledged appends, {len(concurrent.problems)} problems",
        flush=True,
    )
    return 1 if totals.problems or concurrent.problems else 0


if __name__ == "__main__":
    sys.exit(main())
