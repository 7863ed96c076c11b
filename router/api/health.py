"""Operations: /healthz (the process is up), /readyz (it can serve), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from router import policy
from router.api.deps import declare, get_runtime
from router.metrics import service_snapshot
from router.runtime import Runtime

router = APIRouter(tags=["operations"], dependencies=[declare(policy.PUBLIC)])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", summary="Database reachable, migrations current, a ruleset active, bus connected"
)
async def readyz(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    reasons = await runtime.readiness()
    return JSONResponse(
        {"ready": not reasons, "reasons": reasons}, status_code=200 if not reasons else 503
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    runtime.metrics.update(await runtime.db.read(service_snapshot, runtime.clock.now()))
    return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
