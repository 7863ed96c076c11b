"""B2, webhooks: signed Twilio SMS webhooks -> persisted messages per second.

omniroute (`omniroute serve` on SQLite, synchronous=FULL) checks each request's signature,
stores the message (deduplicated by MessageSid), and answers Twilio only after the commit.
The raw baseline in the same run is a bare FastAPI endpoint in its own process that parses
the same form and checks the same signature, storing nothing. Both are driven by the same
load generator with the same concurrency; 5% of the deliveries are repeated (Twilio retries)
and must be stored once.

Reported: requests/s of each, the ratio (target >= 0.5x), and lost and duplicated messages
(both must be 0).

    python bench/webhooks.py            # full run
    python bench/webhooks.py --smoke    # seconds; run by `make test`
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.serving import (  # noqa: E402
    database,
    serve_baseline,
    serve_omniroute,
    spawn_baseline,
    stop,
)
from fastapi import FastAPI, Request, Response  # noqa: E402

ACCOUNT = "AC" + "b" * 32
TOKEN = "c" * 32
OUR_NUMBER = "+15550000000"
PATH = "/webhooks/twilio/tw/sms"
RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"
CHANNELS = f"""\
version: 1
inboxes:
  tw:
    channel: sms
    provider: twilio
    account_sid: "{ACCOUNT}"
    auth_token: "{TOKEN}"
    from_number: "{OUR_NUMBER}"
    api_base_url: http://127.0.0.1:9
"""


def baseline_app() -> Any:
    from twilio.request_validator import RequestValidator

    app = FastAPI()
    validator = RequestValidator(TOKEN)

    @app.post(PATH)
    async def sms(request: Request) -> Response:
        form = await request.form()
        url = str(request.url)
        if not validator.validate(url, dict(form), request.headers.get("x-twilio-signature", "")):
            return Response(status_code=403)
        if not form.get("MessageSid") or not form.get("From"):
            return Response(status_code=400)
        return Response(
            '<?xml version="1.0" encoding="UTF-8"?><Response></Response>',
            media_type="application/xml",
        )

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def requests(base: str, count: int) -> list[tuple[bytes, dict[str, str]]]:
    """Signed deliveries (signing is done before the clock starts)."""
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(TOKEN)
    url = base + PATH
    out = []
    for i in range(count):
        sid = f"SM{i:032d}"
        params = {
            "MessageSid": sid,
            "SmsMessageSid": sid,
            "AccountSid": ACCOUNT,
            "From": f"+1415555{i % 10000:04d}",
            "To": OUR_NUMBER,
            "Body": f"bench webhook {i}",
            "NumMedia": "0",
            "NumSegments": "1",
            "SmsStatus": "received",
            "ApiVersion": "2010-04-01",
        }
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": validator.compute_signature(url, params),
        }
        out.append((urlencode(params).encode(), headers))
    repeats = [out[i] for i in range(0, count, 20)]  # 5% delivered twice (retries)
    return out + repeats


async def drive(
    base: str, deliveries: list[tuple[bytes, dict[str, str]]], concurrency: int
) -> tuple[float, int]:
    import httpx

    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for item in deliveries:
        queue.put_nowait(item)
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body, headers = queue.get_nowait()
                response = await client.post(PATH, content=body, headers=headers)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server is not None:
        serve_baseline(baseline_app(), args.baseline_server)
        return 0
    count = 40 if args.smoke else args.messages
    concurrency = 8 if args.smoke else args.concurrency
    directory = Path(tempfile.mkdtemp(prefix="omniroute-b2-"))
    results: dict[str, tuple[float, int, int]] = {}
    try:
        proc, port = spawn_baseline(__file__)
        base = f"http://127.0.0.1:{port}"
        try:
            deliveries = requests(base, count)
            elapsed, failures = asyncio.run(drive(base, deliveries, concurrency))
            results["baseline"] = (len(deliveries) / elapsed, failures, 0)
        finally:
            stop(proc)
        proc, base = serve_omniroute(directory, database(directory, RULES, CHANNELS))
        db_path = str(directory / "bench.db")
        try:
            deliveries = requests(base, count)
            elapsed, failures = asyncio.run(drive(base, deliveries, concurrency))
        finally:
            stop(proc)
        with sqlite3.connect(db_path) as db:
            stored = db.execute("select count(*) from messages where direction = 'in'").fetchone()[
                0
            ]
            distinct = db.execute(
                "select count(distinct external_id) from messages where direction = 'in'"
            ).fetchone()[0]
        results["omniroute"] = (len(deliveries) / elapsed, failures, stored)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    lost, duplicated = count - distinct, stored - distinct
    ratio = results["omniroute"][0] / results["baseline"][0]
    print(
        f"B2 signed Twilio SMS webhooks; {count} messages (+5% repeated), concurrency {concurrency}"
    )
    print(f"{'run':<12}{'req/s':>10}{'non-200':>9}")
    for name, (rate, failed, _) in results.items():
        print(f"{name:<12}{rate:>10.1f}{failed:>9}")
    print(f"ratio: {ratio:.2f}x the bare endpoint (target >= 0.5x)")
    print(f"stored {stored} of {count}: lost {lost}, duplicated {duplicated}")
    if lost or duplicated or results["omniroute"][1]:
        print("FAILED: messages lost, duplicated or refused")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
