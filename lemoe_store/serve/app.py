"""The OpenAI-compatible ASGI app: /v1/models, /v1/completions, /v1/chat/completions.

Every answer carries a `lemoe` object (and `x-lemoe-*` headers) naming the version asked and the edit
that answered, and is appended to the store's audit trail. All model work happens on the engine's worker
thread; the event loop only parses, streams and writes JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..audit import BASE, AuditRecord, AuditWriter, prompt_digest
from ..repo import UNROUTED
from ..stores import AmbiguousRevisionError, BadNameError, BadRevisionError
from .engine import BadRequest, Engine, Generation, ModelNotFound, Sampling
from .protocol import ChatRequest, CompletionRequest, error_body, provenance, provenance_headers, usage

log = logging.getLogger("lemoe.serve")

# Which of our exceptions becomes which HTTP status and OpenAI error code (a subclass's handler wins).
_CLIENT_ERRORS: list[tuple[type[Exception], int, str | None]] = [
    (AmbiguousRevisionError, 400, "model_ambiguous"),
    (ModelNotFound, 404, "model_not_found"),
    (BadRevisionError, 404, "model_not_found"),
    (BadNameError, 404, "model_not_found"),
    (BadRequest, 400, None),
]


def create_app(engine: Engine, audit: AuditWriter, *, api_key: str | None = None,
               log_prompts: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("shutting down: writing the audit trail")
        engine.close()
        audit.close()

    app = FastAPI(title="lemoe serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(401, "Incorrect API key provided: pass it as `Authorization: Bearer KEY`")

    def record(endpoint: str, model: str, prompt: str, generation: Generation) -> None:
        route = generation.route
        audit.append(AuditRecord(
            time=time.time(), endpoint=endpoint, model=model, version=generation.version,
            routed_commit=route.commit if route.routed else BASE, expert=route.expert,
            fact_id=route.fact_id if route.routed else None, similarity=route.similarity,
            prompt_sha256=prompt_digest(prompt), prompt=prompt if log_prompts else None,
            completion_tokens=generation.completion_tokens, finish_reason=generation.finish_reason))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def list_models() -> dict:
        models = await engine.call(engine.models)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(created), "owned_by": "lemoe", "lemoe": {"version": cid}}
            for name, cid, created in models]}

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    async def completions(body: CompletionRequest):
        prompt = body.prompt_text
        cid, ids, max_tokens = await engine.call(_prepare, engine, body.model, engine.encode_completion, prompt,
                                                 body.max_tokens)
        reply = _Reply("cmpl", "text_completion", body.model)

        def choice(text: str | None, finish: str | None) -> dict:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        def done(generation: Generation) -> None:
            record("completions", body.model, prompt, generation)

        sampling = body.sampling(max_tokens)
        if body.stream:
            return await _stream(engine, cid, ids, sampling, reply, choice, body.include_usage, done)
        generation = await engine.call(engine.generate, cid, ids, sampling)
        done(generation)
        return reply.response(generation, choice(generation.text, generation.finish_reason))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatRequest):
        messages = [m.as_template_input() for m in body.messages]
        cid, ids, max_tokens = await engine.call(_prepare, engine, body.model, engine.encode_chat, messages,
                                                 body.token_limit)
        reply = _Reply("chatcmpl", "chat.completion", body.model)

        def choice(text: str | None, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            return {"index": 0, "delta": {} if finish else delta, "logprobs": None, "finish_reason": finish}

        def message(generation: Generation) -> dict:
            return {"index": 0, "message": {"role": "assistant", "content": generation.text, "refusal": None},
                    "logprobs": None, "finish_reason": generation.finish_reason}

        def done(generation: Generation) -> None:
            record("chat.completions", body.model, json.dumps(messages, ensure_ascii=False), generation)

        sampling = body.sampling(max_tokens)
        if body.stream:
            reply.object = "chat.completion.chunk"
            return await _stream(engine, cid, ids, sampling, reply, choice, body.include_usage, done)
        generation = await engine.call(engine.generate, cid, ids, sampling)
        done(generation)
        return reply.response(generation, message(generation))

    return app


def _prepare(engine: Engine, model: str, encode: Callable, prompt, max_tokens: int | None) -> tuple[str, list[int], int]:
    """On the worker: the version, the prompt's tokens and the max_tokens that fits."""
    cid = engine.resolve(model)
    ids = encode(prompt)
    if not ids:
        raise BadRequest("the prompt is empty")
    return cid, ids, engine.check_length(len(ids), max_tokens)


class _Reply:
    """The id, object type and model name shared by a response and all of its streamed chunks."""

    def __init__(self, prefix: str, object_type: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.object = object_type
        self.model = model
        self.created = int(time.time())

    def chunk(self, choice: dict | None, **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice] if choice else [], **extra}

    def response(self, generation: Generation, choice: dict) -> JSONResponse:
        body = self.chunk(choice, usage=usage(generation), lemoe=provenance(generation))
        return JSONResponse(body, headers=provenance_headers(generation))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, cid: str, ids: list[int], sampling: Sampling, reply: _Reply,
                  choice: Callable[[str | None, str | None], dict], include_usage: bool,
                  done: Callable[[Generation], None]) -> StreamingResponse:
    """Start generating; once the prompt is routed, answer with server-sent events (provenance first)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    def put(kind: str, value: object = None) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    generation = Generation(cid, UNROUTED, len(ids))
    future = engine.submit(lambda: engine.generate(cid, ids, sampling, on_start=lambda _g: put("start"),
                                                   on_text=lambda text: put("text", text), generation=generation))
    future.add_done_callback(lambda f: put("done", f))
    kind, value = await events.get()
    if kind == "done":
        value.result()  # it failed before the first token: raise, to answer with a JSON error

    async def body() -> AsyncIterator[str]:
        finished = False
        try:
            yield _sse(reply.chunk(choice(None, None), lemoe=provenance(generation)))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield _sse(reply.chunk(choice(value, None)))
                elif kind == "done":
                    break
            finished = True
            if value.exception() is not None:
                log.error("generation failed mid-stream", exc_info=value.exception())
                yield _sse(error_body("the server failed while generating", "server_error"))
                return
            done(generation)
            yield _sse(reply.chunk(choice("", generation.finish_reason)))
            if include_usage:
                yield _sse(reply.chunk(None, usage=usage(generation)))
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client went away: stop generating for it
                generation.cancelled = True

    return StreamingResponse(body(), media_type="text/event-stream", headers=provenance_headers(generation))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(*_describe(exc.errors())), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    for kind, status, code in _CLIENT_ERRORS:
        app.add_exception_handler(kind, _client_error(status, code))

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body("the server failed while handling the request", "server_error"),
                            status_code=500)


def _client_error(status: int, code: str | None):
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(str(exc), code=code), status_code=status)

    return handler


def _describe(errors: list[dict]) -> tuple[str, str, str | None, str | None]:
    """OpenAI-style (message, type, param, code) for the first validation error."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first["type"] == "json_invalid":
        return ("We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
                "invalid_request_error", None, "invalid_json")
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", "invalid_request_error", param, None
    if first["type"] == "missing":
        return f"Missing required parameter: '{param}'.", "invalid_request_error", param, None
    return f"Invalid value for '{param}': {first['msg']}.", "invalid_request_error", param, None
