"""`make bench` part for the change feeds and streamed messages (issue 12), against a real server.

A uvicorn process on the sqlite store (fsync=always, access lines off); httpx clients in this
process generate the load, so on 2 cores the load generator competes with the server.
Prints three figures (FIG=123 picks them), asserts nothing:

1. append throughput with 1,000 idle subscribers open vs none (before and after);
2. 100 subscribers on one session, appends offered at RATE/s (500): ack -> delivery p50/p99;
3. STREAMS (200) streamed messages, one delta every 50 ms each: delta latency p50/p99 and
   server CPU per delta vs per plain append.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server.proc import free_port, running_server, server_env

ID = re.compile(rb"^id: (\d+)\r?$", re.M)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


async def new_session(client: httpx.AsyncClient) -> str:
    return str((await client.post("/v1/sessions", json={})).json()["id"])


async def append_throughput(client: httpx.AsyncClient, seconds: float, workers: int = 16) -> float:
    sessions = [await new_session(client) for _ in range(workers)]
    done = 0
    stop = time.perf_counter() + seconds

    async def work(sid: str) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            r = await client.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "hello there"})
            assert r.status_code == 201
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(work(s) for s in sessions))
    return done / (time.perf_counter() - start)


async def idle_subscribers(base: str, count: int) -> tuple[httpx.AsyncClient, list[asyncio.Task[None]]]:
    subs = httpx.AsyncClient(base_url=base, timeout=None, limits=httpx.Limits(max_connections=count + 10))
    opened = asyncio.Event()
    ready = 0

    async def hold(sid: str) -> None:
        nonlocal ready
        async with subs.stream("GET", f"/v1/sessions/{sid}/events") as r:
            ready += 1
            if ready == count:
                opened.set()
            async for _ in r.aiter_raw():
                pass

    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        sids = [await new_session(c) for _ in range(count)]
    tasks = [asyncio.create_task(hold(s)) for s in sids]
    await asyncio.wait_for(opened.wait(), 120)
    return subs, tasks


async def figure_idle(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=64)) as client:
        await append_throughput(client, 1.0)  # warm up
        none = await append_throughput(client, 4.0)
        subs, tasks = await idle_subscribers(base, 1000)
        with_idle = await append_throughput(client, 4.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await subs.aclose()
        await asyncio.sleep(1)
        none2 = await append_throughput(client, 4.0)
    base_rate = (none + none2) / 2
    print(
        f"1. appends/s with no subscriber {none:.0f} and {none2:.0f} (before/after), with 1,000 idle subscribers "
        f"{with_idle:.0f}: ratio {with_idle / base_rate:.2f}"
    )


async def figure_fanout(base: str, rate: float, seconds: float, count: int = 100) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        sid = await new_session(client)
    acked: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    delivered: list[tuple[int, float]] = []
    subs = httpx.AsyncClient(base_url=base, timeout=None, limits=httpx.Limits(max_connections=count + 10))
    ready = 0
    opened = asyncio.Event()

    async def read() -> None:
        nonlocal ready
        async with subs.stream("GET", f"/v1/sessions/{sid}/events") as r:
            ready += 1
            if ready == count:
                opened.set()
            async for chunk in r.aiter_raw():
                now = time.perf_counter()
                for m in ID.finditer(chunk):
                    delivered.append((int(m.group(1)), now))

    tasks = [asyncio.create_task(read()) for _ in range(count)]
    await asyncio.wait_for(opened.wait(), 60)
    sent = 0
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            t0 = time.perf_counter()
            r = await client.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "x"})
            v = int(r.headers["ETag"].strip('"'))
            acked[v] = time.perf_counter()
            sent_at[v] = t0

        while time.perf_counter() - start < seconds:
            target = start + sent / rate
            await asyncio.sleep(max(0.0, target - time.perf_counter()))
            t = asyncio.create_task(one())
            pending.add(t)
            t.add_done_callback(pending.discard)
            sent += 1
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    await asyncio.sleep(2.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await subs.aclose()
    lat = [(at - acked[v]) * 1000 for v, at in delivered if v in acked]
    since_sent = [(at - sent_at[v]) * 1000 for v, at in delivered if v in sent_at]
    print(f"   send->delivery p50 {pct(since_sent, 0.5):.1f} ms, p99 {pct(since_sent, 0.99):.1f} ms")
    expected = len(acked) * count
    print(
        f"2. {count} subscribers on one session, {sent / elapsed:.0f} appends/s offered for {seconds:.0f} s: "
        f"{len(lat)}/{expected} deliveries; ack->delivery p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms "
        f"(negative: delivered before the writer saw its ack)"
    )


async def figure_deltas(base: str, pid: int, streams: int = 200, interval: float = 0.05, seconds: float = 5.0) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=streams + 10)) as c:
        sids = [await new_session(c) for _ in range(streams)]
        seqs = []
        for sid in sids:
            body = {"role": "assistant", "content": "", "status": "in_progress"}
            seqs.append((await c.post(f"/v1/sessions/{sid}/messages", json=body)).json()["seq"])
        latencies: list[float] = []
        cpu0 = cpu_seconds(pid)
        stop = time.perf_counter() + seconds

        async def stream(sid: str, seq: int) -> None:
            nxt = time.perf_counter()
            while nxt < stop:
                await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
                t0 = time.perf_counter()
                key = {"Idempotency-Key": f"{sid}-{nxt}"}
                for _ in range(3):
                    try:
                        r = await c.post(
                            f"/v1/sessions/{sid}/messages/{seq}/deltas", json={"content": "tok "}, headers=key
                        )
                        break
                    except httpx.TransportError:
                        continue
                assert r.status_code == 200, r.text
                latencies.append((time.perf_counter() - t0) * 1000)
                nxt += interval

        start = time.perf_counter()
        await asyncio.gather(*(stream(s, q) for s, q in zip(sids, seqs, strict=True)))
        elapsed = time.perf_counter() - start
        cpu_delta = (cpu_seconds(pid) - cpu0) / max(1, len(latencies))
        # The same number of plain appends, as fast as the same concurrency goes.
        n = len(latencies)
        cpu0 = cpu_seconds(pid)
        per = n // streams

        async def appends(sid: str) -> None:
            for _ in range(per):
                for _ in range(3):
                    try:
                        await c.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "tok "})
                        break
                    except httpx.TransportError:
                        continue

        await asyncio.gather(*(appends(s) for s in sids))
        cpu_append = (cpu_seconds(pid) - cpu0) / (per * streams)
    print(
        f"3. {streams} streamed messages, a delta every {interval * 1000:.0f} ms each "
        f"({streams / interval:.0f}/s offered, {n / elapsed:.0f}/s done): "
        f"delta latency p50 {pct(latencies, 0.5):.1f} ms, "
        f"p99 {pct(latencies, 0.99):.1f} ms; server CPU per delta {cpu_delta * 1e6:.0f} us vs per append "
        f"{cpu_append * 1e6:.0f} us (ratio {cpu_delta / cpu_append:.2f})"
    )


async def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        env = server_env(CHATSESSIONS_DATA_DIR=data, CHATSESSIONS_LOG_LEVEL="warning")
        with running_server(env, free_port()) as server:
            which = os.environ.get("FIG", "123")
            if "1" in which:
                await figure_idle(server.base_url)
            if "2" in which:
                await figure_fanout(server.base_url, rate=float(os.environ.get("RATE", "500")), seconds=4.0)
            if "3" in which:
                await figure_deltas(server.base_url, server.process.pid, streams=int(os.environ.get("STREAMS", "200")))


asyncio.run(main())
