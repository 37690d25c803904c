"""Closed-loop load on ``POST /v1/embeddings`` of a server on 127.0.0.1, from wrk, hey or Python clients.

Each generator runs ``warmup`` unmeasured seconds, then ``seconds`` measured, with ``clients`` connections, each
sending its next request as soon as the last is answered; a request carries ``per_request`` consecutive corpus
texts. Every generator returns a *cell* with the same keys: req/s and docs/s of the 2xx answers, p50/p95/p99
latency, requests answered, 2xx, 429, other non-2xx, 5xx and connection errors.

- ``wrk`` (default): a C program in its own process, so the client does not share the server's interpreter; a Lua
  script cycles the requests through the corpus (every request a different body, as real traffic is). Its
  latency percentiles are over every answered request, non-2xx included (``latency_of`` says so). Between the
  unmeasured and the measured run wrk restarts, so the requests in flight at the end of the warm-up are abandoned,
  as by clients that time out: a server that computes abandoned requests pays for them in the measured window.
- ``hey``: also outside Python, but it sends one body for every request of a cell (the first ``per_request``
  corpus texts), so its batches see texts of one length.
- ``python``: ``httpx`` clients in this process (it shares the machine's cores with the server like the others,
  and its interpreter with nothing else).

wrk and hey come from Debian's packages; ``require_tool`` installs the missing one with ``apt-get`` when it can.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GENERATORS = ("wrk", "hey", "python")
PATH = "/v1/embeddings"

WRK_SCRIPT = r"""
-- bench.speed.load_generators: cycle the request bodies of BODIES (one JSON per line), count statuses, report as JSON.
local bodies, pos, threads = {}, 0, {}
counts = {}  -- a global, so that done() can read it from each thread (thread:get)
function setup(thread) table.insert(threads, thread) end
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  pos = tonumber(args[2]) or 0
end
function request()
  pos = pos % #bodies + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"}, bodies[pos])
end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local statuses = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("counts")) do statuses[#statuses + 1] = string.format('"%d": %d', code, n) end
  end
  local e = summary.errors
  io.write(string.format('\nWRK-RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), table.concat(statuses, ", ")))
end
"""


def require_tool(name: str) -> str:
    """The path of ``name`` (wrk or hey), installed from Debian's packages if missing and apt-get can."""
    found = shutil.which(name)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt:
        subprocess.run([apt, "install", "-y", "-q", name], check=False, capture_output=True, timeout=600)
        found = shutil.which(name)
    if not found:
        raise RuntimeError(f"the load generator {name!r} is not installed and apt-get could not install it: "
                           f"apt-get install {name}, or pass --load-generator python")
    return found


def request_bodies(items: list[Any], per_request: int, count: int) -> list[bytes]:
    """``count`` request bodies of ``per_request`` consecutive corpus texts, going round the corpus."""
    bodies = []
    for k in range(count):
        start = k * per_request
        batch = [items[(start + j) % len(items)] for j in range(per_request)]
        bodies.append(json.dumps({"input": batch, "encoding_format": "float"}).encode())
    return bodies


def run_cell(generator: str, url: str, items: list[Any], clients: int, per_request: int, warmup: float, seconds: float,
             timeout: float) -> dict[str, Any]:
    """One cell of load (module doc) from ``generator``."""
    if generator == "python":
        cell = _python_cell(url, items, clients, per_request, warmup, seconds, timeout)
    elif generator in ("wrk", "hey"):
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            runner = _wrk_cell if generator == "wrk" else _hey_cell
            cell = runner(url, items, clients, per_request, warmup, seconds, timeout, Path(tmp))
    else:
        raise ValueError(f"unknown load generator {generator!r} (choose from {', '.join(GENERATORS)})")
    cell.update(clients=clients, items_per_request=per_request, load_generator=generator,
                latency_of="2xx answers" if generator == "python" else "all answers")
    cell["docs_per_s"] = cell["requests_per_s"] * per_request
    return cell


def _cell(ok: int, seconds: float, p50_ms: float, p95_ms: float, p99_ms: float, statuses: dict[int, int],
          connection_errors: int, error_kinds: dict[str, int]) -> dict[str, Any]:
    answered = sum(statuses.values())
    latencies = [p50_ms, p95_ms, p99_ms] if ok else [None, None, None]  # none measured: no figure rather than wrk's 0
    return {
        "requests_per_s": ok / seconds,
        "p50_ms": latencies[0], "p95_ms": latencies[1], "p99_ms": latencies[2],
        "measured_requests": ok,
        "answered": answered,
        "sent": answered + connection_errors,
        "status_2xx": ok,
        "status_429": statuses.get(429, 0),
        "status_5xx": sum(n for code, n in statuses.items() if code >= 500),
        "non_2xx": answered - ok,
        "connection_errors": connection_errors,
        "connection_error_kinds": error_kinds,
    }


def _wrk_cell(url: str, items: list[Any], clients: int, per_request: int, warmup: float, seconds: float, timeout: float,
              tmp: Path) -> dict[str, Any]:
    wrk = require_tool("wrk")
    bodies = tmp / "bodies.jsonl"
    bodies.write_bytes(b"\n".join(request_bodies(items, per_request, max(1, len(items) // per_request))) + b"\n")
    script = tmp / "cycle.lua"
    script.write_text(WRK_SCRIPT)

    def run(duration: float, offset: int) -> dict[str, Any]:
        cmd = [wrk, "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", f"--timeout={max(1, round(timeout))}s", "-s", str(script),
               url + PATH, "--", str(bodies), str(offset)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 60)
        found = re.search(r"^WRK-RESULT (.*)$", out.stdout, re.M)
        if not found:
            raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stderr.strip() or out.stdout[-500:]}")
        return json.loads(found.group(1))

    if warmup > 0:
        run(warmup, 0)
    r = run(seconds, len(items) // (2 * per_request))
    statuses = {int(k): v for k, v in r["statuses"].items()}
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    kinds = {k: r[k] for k in ("connect", "read", "write", "timeout") if r[k]}
    return _cell(ok, r["duration_us"] / 1e6, r["p50_us"] / 1000, r["p95_us"] / 1000, r["p99_us"] / 1000, statuses,
                 sum(kinds.values()), kinds)


def _hey_cell(url: str, items: list[Any], clients: int, per_request: int, warmup: float, seconds: float, timeout: float,
              tmp: Path) -> dict[str, Any]:
    hey = require_tool("hey")
    body = tmp / "body.json"
    body.write_bytes(request_bodies(items, per_request, 1)[0])

    def run(duration: float) -> str:
        cmd = [hey, "-z", f"{max(1, round(duration))}s", "-c", str(clients), "-t", str(max(1, round(timeout))), "-m", "POST",
               "-T", "application/json", "-D", str(body), url + PATH]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 60)
        if out.returncode != 0 or "Status code distribution" not in out.stdout and "Error distribution" not in out.stdout:
            raise RuntimeError(f"hey gave no result (exit {out.returncode}): {out.stderr.strip() or out.stdout[-500:]}")
        return out.stdout

    if warmup > 0:
        run(warmup)
    text = run(seconds)
    total = float(re.search(r"Total:\s+([\d.]+) secs", text).group(1))  # type: ignore[union-attr]

    def pct(p: int) -> float:
        found = re.search(rf"\s{p}% in ([\d.]+) secs", text)
        return float(found.group(1)) * 1000 if found else float("nan")

    statuses = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    kinds: dict[str, int] = {}
    errors = text.split("Error distribution:", 1)[1] if "Error distribution:" in text else ""
    for n, what in re.findall(r"\[(\d+)\]\s+(.+)", errors):
        kind = next((k for k, word in (("timeout", "Timeout"), ("timeout", "deadline"), ("read", "reset"), ("connect", "refused"))
                     if word in what), "other")
        kinds[kind] = kinds.get(kind, 0) + int(n)
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    return _cell(ok, total, pct(50), pct(95), pct(99), statuses, sum(kinds.values()), kinds)


def _python_cell(url: str, items: list[Any], clients: int, per_request: int, warmup: float, seconds: float,
                 timeout: float) -> dict[str, Any]:
    errors: dict[str, int] = {}
    t0 = time.perf_counter()
    records = asyncio.run(_drive(url, items, clients, per_request, warmup + seconds, timeout, errors))
    start, end = t0 + warmup, t0 + warmup + seconds
    window = [(s, e, status) for s, e, status in records if start <= e <= end]
    done = [(e - s) * 1000 for s, e, status in window if 200 <= status < 300]
    lat = np.array(done) if done else np.array([np.nan])
    statuses: dict[int, int] = {}
    for _, _, status in window:
        if status > 0:
            statuses[status] = statuses.get(status, 0) + 1
    failed = sum(status == -1 for _, _, status in window)
    return _cell(len(done), seconds, *(float(np.percentile(lat, p)) for p in (50, 95, 99)), statuses, failed, errors)


async def _drive(url: str, items: list[Any], clients: int, per_request: int, duration: float, timeout: float,
                 errors: dict[str, int]) -> list[tuple[float, float, int]]:
    """(start, end, status) of every request; status -1 for a transport error, counted by kind in ``errors``."""
    import httpx

    records: list[tuple[float, float, int]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        end = time.perf_counter() + duration

        async def client(k: int) -> None:
            pos = (k * len(items)) // clients
            while time.perf_counter() < end:
                batch = [items[(pos + j) % len(items)] for j in range(per_request)]
                pos += per_request
                started = time.perf_counter()
                try:
                    r = await http.post(PATH, json={"input": batch, "encoding_format": "float"})
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = -1
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                records.append((started, time.perf_counter(), status))

        await asyncio.gather(*(client(k) for k in range(clients)))
    return records
