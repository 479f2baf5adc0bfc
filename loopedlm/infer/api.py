"""The HTTP API of `loopedlm serve` (`loopedlm.infer.server`): the body of
POST /v1/completions, and errors in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (unknown fields are ignored, as OpenAI does)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: Any = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=1)
    n_loops: int | None = Field(None, ge=1)
    adaptive_threshold: float | None = Field(None, ge=0)
    return_loops: bool = False
    timeout: float | None = Field(None, gt=0)


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = \
            status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message (and the first bad field) for a body that failed validation."""
    parts, param = [], None
    for error in exc.errors()[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', '')})")
            continue
        where = ".".join(loc) or "body"
        param = param or where
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)[:60]})"
        parts.append(f"{where}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(parts) or "invalid request", param


__all__ = ["CompletionRequest", "ApiError", "validation_message"]
