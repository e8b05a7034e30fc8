"""The one function that builds the service's OpenAPI document."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from chatsessions.api.auth import SECURITY_SCHEME, is_public
from chatsessions.api.problems import PROBLEM_JSON
from chatsessions.config import Settings

REQUEST_ID_DOC = {
    "description": "The request's id: the client's X-Request-ID when valid (1-128 visible ASCII characters), "
    "otherwise one the service made. It is in the service's log lines for the request.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x21-\\x7E]{1,128}$"},
}


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """OpenAPI of the app's routes: errors as application/problem+json, X-Request-ID on every answer,
    and, when keys are configured, the Bearer scheme and a 401 on every protected operation."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    keys = settings.keys_file is not None
    if keys:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `chatsessions keys create`; it selects the tenant.",
        }
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if keys and not is_public(path):
                operation["security"] = [{SECURITY_SCHEME: []}]
                responses["401"] = {
                    "description": "Missing or invalid API key",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
            for status, response in responses.items():
                content = response.get("content", {})
                if status[0] in "45" and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
                    response["content"] = content
                response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_DOC
    app.openapi_schema = schema
    return schema
