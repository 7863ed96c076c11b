"""Reports for supervisors (docs/kpis.md): KPIs per queue, agent or channel and period, as
JSON or CSV; the backlog now; the fairness view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, Response

from router import policy
from router.agents import agent_by_name
from router.api.deps import get_runtime, needs
from router.exceptions import InvalidInput, NotFound
from router.policy import Caller
from router.reports import backlog, fairness, kpi_report, to_csv
from router.runtime import Runtime

router = APIRouter(prefix="/api/reports", tags=["reports"])
supervisor = needs(policy.REPORTS)


def _period(
    runtime: Runtime, start: datetime | None, end: datetime | None
) -> tuple[datetime, datetime]:
    end = end or runtime.clock.now() + timedelta(seconds=1)  # up to now, this second included
    start = start or end - timedelta(days=1)
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    if end <= start:
        raise InvalidInput("end must be after start", field="end")
    if end - start > timedelta(days=400):
        raise InvalidInput("a report covers at most 400 days", field="start")
    return start, end


def _answer(data: dict[str, Any], rows: list[dict[str, Any]], fmt: str, name: str) -> Any:
    if fmt == "csv":
        return PlainTextResponse(
            to_csv(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    return data


@router.get(
    "/kpis",
    response_model=None,
    summary="First response, handle and resolution times, FCR, abandonment, SLA, CSAT",
)
async def kpis(
    start: datetime | None = Query(None, description="RFC 3339; default: a day before end"),
    end: datetime | None = Query(None, description="RFC 3339; default: now"),
    by: Literal["queue", "agent", "channel"] = "queue",
    queue: str | None = None,
    channel: str | None = None,
    agent: str | None = Query(None, description="an agent's user name"),
    format: Literal["json", "csv"] = "json",
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(supervisor),
) -> Response | dict[str, Any]:
    start, end = _period(runtime, start, end)
    visible = policy.visible_conversations(caller)
    agent_id = None
    if agent is not None:
        agent_id = await runtime.db.read(agent_by_name, agent)
        if agent_id is None:
            raise NotFound(f'no agent "{agent}"')
    ruleset = runtime.rules.ruleset
    report = await runtime.db.read(
        lambda c: kpi_report(
            c,
            ruleset,
            start,
            end,
            by=by,
            queue=queue,
            channel=channel,
            agent_id=agent_id,
            visible=visible,
        )
    )
    return _answer(report, report["rows"], format, f"kpis-by-{by}")


@router.get("/backlog", response_model=None, summary="Open conversations per queue now")
async def get_backlog(
    format: Literal["json", "csv"] = "json",
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(supervisor),
) -> Response | dict[str, Any]:
    rows = await runtime.db.read(backlog, runtime.clock.now(), policy.visible_conversations(caller))
    return _answer({"rows": rows}, rows, format, "backlog")


@router.get(
    "/fairness",
    response_model=None,
    summary="Offers and handled work per agent against their capacity",
)
async def get_fairness(
    start: datetime | None = None,
    end: datetime | None = None,
    format: Literal["json", "csv"] = "json",
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(supervisor),
) -> Response | dict[str, Any]:
    start, end = _period(runtime, start, end)
    ruleset = runtime.rules.ruleset
    visible = policy.visible_conversations(caller)

    def read(c: Any) -> list[dict[str, Any]]:
        return fairness(kpi_report(c, ruleset, start, end, by="agent", visible=visible), c)

    rows = await runtime.db.read(read)
    return _answer({"rows": rows}, rows, format, "fairness")
