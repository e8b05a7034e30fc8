"""Liveness and readiness probes; they need no key."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from chatsessions.api.deps import RepositoryDep
from chatsessions.api.problems import problem_responses
from chatsessions.api.routing import JSONRoute


class Health(BaseModel):
    status: str


router = APIRouter(tags=["health"], route_class=JSONRoute)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=problem_responses(503))
async def readyz(repository: RepositoryDep) -> Health:
    """Readiness: the storage can take writes."""
    await repository.check_ready()
    return Health(status="ready")
