"""`make bench` part for search and citations (issue 14), in process on the sqlite store.

Seeds BENCH_SEARCH_MESSAGES messages (default 1,000,000) over BENCH_SEARCH_SESSIONS sessions
(10,000) through the repository, then measures, each over BENCH_SEARCH_QUERIES queries (200):

- search p50/p99 for a rare word (in ~10 messages), a common word (in every 10th message) and a
  two-word phrase;
- citations lookup p50/p99 (a document cited ~100 times);
- append throughput with indexing against the same appends whose text has no word to index
  (punctuation of the same length), measured in the same run: the ratio is the indexing cost;
- the size on disk of the full-text and citations indexes as a share of the messages table.

Prints a Markdown table and writes it to bench/results/search.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import apsw

from chatsessions.config import Settings
from chatsessions.models import CitationFilter, MessageCreate, Role, SearchFilter, SessionCreate
from chatsessions.storage.sqlite import SqliteSessionRepository
from chatsessions.storage.sqlite.schema import DB_NAME
from chatsessions.text import SearchQuery

MESSAGES = int(os.environ.get("BENCH_SEARCH_MESSAGES", "1000000"))
SESSIONS = int(os.environ.get("BENCH_SEARCH_SESSIONS", "10000"))
QUERIES = int(os.environ.get("BENCH_SEARCH_QUERIES", "200"))
APPENDS = int(os.environ.get("BENCH_SEARCH_APPENDS", "20000"))
TENANT = "bench"
VOCABULARY = [f"w{i:05d}" for i in range(20_000)]
ENGLISH = "The quick brown fox jumps over the lazy dog. " * 5


def text(rng: random.Random, n: int) -> str:
    words = rng.choices(VOCABULARY, k=40)
    if n % 10 == 0:
        words.append("frequent")
    if n % (MESSAGES // 10) == 7:
        words.append("needle")
    if n % 1000 == 3:
        words += ["golden", "retriever"]
    return " ".join(words)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def timed(calls: int, call: object) -> tuple[float, float]:
    samples: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), percentile(samples, 99)


async def append_rate(repo: SqliteSessionRepository, make: object, sessions: int = 64) -> float:
    async def writer(i: int) -> None:
        for n in range(APPENDS // sessions):
            await repo.append_messages(TENANT, f"append-{i}", [make(n)])  # type: ignore[operator]

    started = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(sessions)))
    return APPENDS / (time.perf_counter() - started)


async def main() -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="chatsessions-bench-search-") as scratch:
        data = Path(scratch) / "data"
        repo = await SqliteSessionRepository.open(Settings(data_dir=data, fsync="never"))
        try:
            started = time.perf_counter()
            await asyncio.gather(*(repo.create_session(TENANT, SessionCreate(id=f"s{i}")) for i in range(SESSIONS)))
            per_session = MESSAGES // SESSIONS
            n = 0
            for start in range(0, SESSIONS, 64):
                batch = []
                for i in range(start, min(start + 64, SESSIONS)):
                    messages = []
                    for _ in range(per_session):
                        refs = [{"doc_id": f"doc{n % 10_000}", "page": n % 50}] if n % 10 == 0 else None
                        messages.append(MessageCreate(role=Role.assistant, content=text(rng, n), references=refs))
                        n += 1
                    batch += [
                        repo.append_messages(TENANT, f"s{i}", messages[k : k + 100])
                        for k in range(0, len(messages), 100)
                    ]
                await asyncio.gather(*batch)
            seeded = time.perf_counter() - started

            def search(q: str) -> object:
                query = SearchQuery.parse(q)
                return lambda: repo.search(TENANT, query, filters=SearchFilter(), limit=20, offset=0)

            rows: list[tuple[str, str]] = [("seeded", f"{n:,} messages in {SESSIONS:,} sessions, {seeded:.0f} s")]
            for label, q in (
                ("rare word", "needle"),
                ("common word", "frequent"),
                ("two-word phrase", '"golden retriever"'),
            ):
                p50, p99 = await timed(QUERIES, search(q))
                rows.append((f"search, {label}", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))
            p50, p99 = await timed(
                QUERIES,
                lambda: repo.list_citations(TENANT, "doc77", filters=CitationFilter(), limit=20, cursor=None),
            )
            rows.append(("citations lookup", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))

            await asyncio.gather(*(repo.create_session(TENANT, SessionCreate(id=f"append-{i}")) for i in range(64)))
            # The append benchmark's message (45 words, 9 distinct) and 40 words drawn from a
            # 20,000-word vocabulary (40 distinct: FTS5's cost grows with distinct words).
            samples = {"the append bench's message": ENGLISH, "40 distinct words": text(rng, 1)}
            for label, sample in samples.items():
                with_words = MessageCreate(role=Role.user, content=sample)
                without = MessageCreate(role=Role.user, content="." * len(sample))
                rates: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(2):  # alternate, so that drift in the machine's load touches both
                    rates[False].append(await append_rate(repo, lambda _n, m=without: m))
                    rates[True].append(await append_rate(repo, lambda _n, m=with_words: m))
                indexed, unindexed = statistics.median(rates[True]), statistics.median(rates[False])
                ratio = indexed / unindexed
                figure = f"{indexed:,.0f}/s vs {unindexed:,.0f}/s with no word to index: {ratio:.2f} x"
                rows.append((f"appends with indexing, {label}", figure))
        finally:
            await repo.aclose()
        conn = apsw.Connection(str(data / DB_NAME), flags=apsw.SQLITE_OPEN_READONLY)
        sizes = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
        conn.close()
        fts = sum(v for k, v in sizes.items() if k.startswith("message_words"))
        cites = sum(v for k, v in sizes.items() if k.startswith("citations"))
        messages = sizes.get("messages", 0)
        rows.append(
            (
                "index size on disk",
                f"full-text {fts / 2**20:.0f} MiB ({fts / messages:.0%} of messages' {messages / 2**20:.0f} MiB), "
                f"citations {cites / 2**20:.0f} MiB ({cites / messages:.0%})",
            )
        )
    table = "| search and citations (sqlite, in process) | figure |\n|---|---|\n" + "\n".join(
        f"| {a} | {b} |" for a, b in rows
    )
    print(table)
    await asyncio.to_thread(write_results, table)


def write_results(table: str) -> None:
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "search.md").write_text(table + "\n")


if __name__ == "__main__":
    asyncio.run(main())
