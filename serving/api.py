"""The HTTP side: OpenAI routes, API keys, body limit, validation, OpenAI error objects, SSE streaming.

The ingress deployment holds no model. It checks the request, looks the adapter up in the registry
(serving/registry.py), and sends the request to a model replica with `multiplexed_model_id="id@version"`,
so that Serve routes it to a replica that already holds that adapter version (app.py).
"""

# No `from __future__ import annotations` here: Serve rebuilds the route functions of a class-based ingress,
# and FastAPI must see `Request` as a class, not as a string it can no longer resolve.
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import ADAPTER_ID
from serving.registry import get_registry


class ApiError(Exception):
    """An OpenAI error object: {"error": {"message", "type", "param", "code"}} with an HTTP status.
    Raised by the ingress and by model replicas (it crosses Ray: everything lives in args and __dict__)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def as_api_error(e: BaseException) -> ApiError:
    """An error from a replica (a Ray error wrapping ours, or an AdapterError) as an ApiError."""
    from serving.types import AdapterError

    seen = e
    while True:
        if isinstance(seen, ApiError):
            return ApiError(seen.message, seen.status, seen.param, seen.code)
        if isinstance(seen, AdapterError):
            return ApiError(str(seen.args[0]) if seen.args else str(seen), getattr(seen, "status", 400))
        cause = getattr(seen, "cause", None) or seen.__cause__
        if not isinstance(cause, BaseException) or cause is seen:
            break
        seen = cause
    first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return ApiError(f"the model replica failed: {first}", 500, code="replica_error")


# --------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # Unknown fields are errors rather than silently ignored: a typo in `max_tokens` must not pass.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = True


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their defaults only (we do not implement them): anything else is a clear 400.
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False, None] = None
    logit_bias: None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError("at most 4 stop sequences", 400, "stop")
        if any(not s for s in stops):
            raise ApiError("stop sequences must not be empty", 400, "stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: Literal[False] = False
    best_of: Literal[1, None] = None
    suffix: None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError("send one prompt per request (a list must hold exactly one string)", 400, "prompt")
        return self.prompt[0]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class RegisterRequest(_Body):
    id: str
    path: str


def _parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object", 400)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"unknown field `{param}`"
        elif err["type"] == "missing":
            msg = f"`{param}` is required"
        else:
            msg = f"`{param}`: {err['msg']} (got {err.get('input')!r})"
        raise ApiError(msg, 400, param, code="invalid_value") from None


# --------------------------------------------------------------------------- the ingress
app = FastAPI(title="fulcrum", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return e.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return ApiError(f"{request.method} {request.url.path}: {e.detail}", e.status_code).response()


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream(
    events: AsyncIterator[list[dict[str, Any]]],
    prompt_tokens: int,
    meta: dict[str, Any],
    chat: bool,
    usage: bool,
) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per item from the replica (the tokens made since the last one; a
    single token while the client keeps up), then (by default) a usage chunk, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    count = 0

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**meta, "object": kind, "choices": [choice]}

    try:
        if chat:
            yield _sse(chunk(None, None, first=True))
        async for batch in events:
            count += len(batch)
            text = "".join(e["text"] for e in batch)
            yield _sse(chunk(text, batch[-1]["finish_reason"]))
    except Exception as e:  # headers are gone: the error goes into the stream as an error object
        err = as_api_error(e)
        yield _sse(
            {"error": {"message": err.message, "type": "server_error", "param": None, "code": err.code}}
        )
        return
    if usage:
        counts = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count,
            "total_tokens": prompt_tokens + count,
        }
        yield _sse({**meta, "object": kind, "choices": [], "usage": counts})
    yield _sse("[DONE]")


@serve.ingress(app)
class OpenAIIngress:
    """OpenAI-compatible routes in front of the model deployment."""

    def __init__(self, model: Any, settings: dict[str, Any]) -> None:
        self.model = model  # handle of the model deployment
        self.base_name: str = settings["base_name"]
        self.keys: list[dict[str, Any]] = settings["keys"]
        self.max_body: int = settings["max_body_bytes"]
        self.roots = [Path(r) for r in settings["adapter_roots"]]
        self.registry = get_registry(settings["app_name"], settings["adapters"])

    # ---- access
    def _key(self, request: Request, admin: bool = False) -> dict[str, Any] | None:
        """The caller's key entry (None when the server has no keys). 401 without a valid key."""
        if not self.keys:
            return None
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise ApiError("missing API key: send `Authorization: Bearer KEY`", 401, code="invalid_api_key")
        given = header[7:].strip().encode()
        found = None
        for entry in self.keys:  # compare with every key, in constant time each
            if hmac.compare_digest(given, entry["key"].encode()):
                found = entry
        if found is None:
            raise ApiError("invalid API key", 401, code="invalid_api_key")
        if admin and not found["admin"]:
            raise ApiError("this route needs an admin key", 403, code="admin_required")
        return found

    @staticmethod
    def _allowed(key: dict[str, Any] | None, model_id: str) -> bool:
        return key is None or key["admin"] or key["adapters"] is None or model_id in key["adapters"]

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        """Read at most max_body bytes (413 beyond), parse JSON (400) and validate (400 naming the field)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ApiError(f"request body of {length} bytes is over the limit of {self.max_body}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(f"request body is over the limit of {self.max_body} bytes", 413)
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"malformed JSON body: {e}", 400, code="invalid_json") from None
        return _parse(model, data)

    async def _known(self, key: dict[str, Any] | None) -> list[str]:
        ids = [self.base_name, *sorted((await self.registry.all.remote()).keys())]
        return [i for i in ids if self._allowed(key, i)]

    async def _entry(self, model_id: str, key: dict[str, Any] | None) -> dict[str, Any] | None:
        """The registry entry of `model_id` (None: the base). 404 listing known ids, 403 if not allowed."""
        entry = None if model_id == self.base_name else await self.registry.get.remote(model_id)
        if model_id != self.base_name and entry is None:
            known = await self._known(key)
            raise ApiError(
                f"model `{model_id}` does not exist; known: {', '.join(known)}",
                404,
                "model",
                "model_not_found",
            )
        if not self._allowed(key, model_id):
            raise ApiError(f"this API key may not use model `{model_id}`", 403, "model", "model_not_allowed")
        return entry

    # ---- models
    def _model_card(self, model_id: str, entry: dict[str, Any] | None) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "fulcrum"}
        if entry is None:
            return {**card, "parent": None, "root": self.base_name}
        return {**card, "parent": self.base_name, "root": entry["path"], "method": entry["method"]}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        key = self._key(request)
        entries = await self.registry.all.remote()
        cards = [self._model_card(self.base_name, None)]
        cards += [self._model_card(i, entries[i]) for i in sorted(entries)]
        return {"object": "list", "data": [c for c in cards if self._allowed(key, c["id"])]}

    @app.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        key = self._key(request)
        return self._model_card(model_id, await self._entry(model_id, key))

    # ---- adapters (admin)
    def _under_roots(self, raw: str) -> Path:
        if "\x00" in raw or "://" in raw:
            raise ApiError("`path` must be a directory path on the server", 400, "path")
        candidates = [Path(raw)] if Path(raw).is_absolute() else [root / raw for root in self.roots]
        for candidate in candidates:
            resolved = candidate.resolve()  # symlinks resolved: a link cannot lead out of a root
            if any(resolved.is_relative_to(root) for root in self.roots) and resolved.is_dir():
                return resolved
        roots = ", ".join(str(r) for r in self.roots) or "(none configured)"
        raise ApiError(
            f"`path` {raw} is not a directory under an adapter root ({roots}); add a root with "
            "--adapter-root or `adapter_roots` in the serve YAML",
            400,
            "path",
        )

    @app.post("/v1/adapters")
    async def register_adapter(self, request: Request) -> dict[str, Any]:
        self._key(request, admin=True)
        body: RegisterRequest = await self._body(request, RegisterRequest)
        if not ADAPTER_ID.fullmatch(body.id):
            raise ApiError("`id` must be a name of letters, digits, `.`, `_`, `-` (not a path)", 400, "id")
        if body.id == self.base_name:
            raise ApiError(f"`id` {body.id} is the base model's name; choose another", 409, "id")
        path = self._under_roots(body.path)
        try:  # a trial load on a replica: a wrong base or a broken adapter is refused now, not per request
            info = await self.model.check_adapter.remote(str(path))
        except Exception as e:
            raise as_api_error(e) from None
        replaced = await self.registry.get.remote(body.id) is not None
        entry = await self.registry.put.remote(body.id, str(path), info["method"])
        return {**self._model_card(body.id, entry), "version": entry["version"], "replaced": replaced}

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(self, adapter_id: str, request: Request) -> dict[str, Any]:
        key = self._key(request, admin=True)
        if not await self.registry.remove.remote(adapter_id):
            known = [i for i in await self._known(key) if i != self.base_name]
            raise ApiError(
                f"adapter `{adapter_id}` does not exist; known: {', '.join(known) or 'none'}",
                404,
                "id",
                "model_not_found",
            )
        return {"id": adapter_id, "object": "model", "deleted": True}

    # ---- generation
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        key = self._key(request)
        body: CompletionRequest = await self._body(request, CompletionRequest)
        job = {"prompt": body.prompt_text(), "max_tokens": body.max_tokens or 16}
        return await self._generate(body, job, key, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        key = self._key(request)
        body: ChatRequest = await self._body(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        # No max_tokens: answer up to the context length (the replica knows it).
        job = {"messages": messages, "max_tokens": body.max_completion_tokens or body.max_tokens}
        return await self._generate(body, job, key, chat=True)

    async def _generate(self, body: _Sampling, job: dict[str, Any], key: Any, chat: bool) -> Any:
        entry = await self._entry(body.model, key)
        job.update(
            temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=body.seed,
            adapter_path=entry["path"] if entry else None,
        )  # fmt: skip
        mux = f"{body.model}@{entry['version']}" if entry else ""
        handle = (
            self.model.options(stream=True, multiplexed_model_id=mux)
            if mux
            else self.model.options(stream=True)
        )
        events = handle.generate.remote(job).__aiter__()
        # The first event (the prompt's size) comes once the replica has checked the request, so that its
        # errors are still HTTP errors.
        try:
            head = await events.__anext__()
        except Exception as e:
            raise as_api_error(e) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": body.model}
        if body.stream:
            usage = body.stream_options.include_usage if body.stream_options else True
            return StreamingResponse(
                _stream(events, head["prompt_tokens"], meta, chat, usage), media_type="text/event-stream"
            )
        text, finish, count = [], None, 0
        try:
            async for batch in events:
                text.extend(e["text"] for e in batch)
                count += len(batch)
                finish = batch[-1]["finish_reason"] or finish
        except Exception as e:
            raise as_api_error(e) from None
        usage = {"prompt_tokens": head["prompt_tokens"], "completion_tokens": count}
        usage["total_tokens"] = usage["prompt_tokens"] + count
        answer = "".join(text)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": finish,
            }
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": answer, "finish_reason": finish, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
