"""Dependency providers and their `Annotated` aliases: what a handler asks for by type."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from chatsessions.api.params import parse_if_match
from chatsessions.config import Settings
from chatsessions.models import DEFAULT_TENANT, Precondition
from chatsessions.storage.base import SessionRepository


async def get_repository(request: Request) -> SessionRepository:
    return cast(SessionRepository, request.state.repository)


async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.state.settings)


async def get_tenant(request: Request) -> str:
    return cast(str, getattr(request.state, "tenant", DEFAULT_TENANT))


RepositoryDep = Annotated[SessionRepository, Depends(get_repository)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
IfMatchDep = Annotated[Precondition | None, Depends(parse_if_match)]
