"""The HTTP side: OpenAI routes, API keys, body limit, validation, OpenAI error objects, SSE streaming.

The ingress deployment holds no model. It checks the request, looks the adapter up in the served set
(serving/registry.py: its Serve `user_config`, applied in `reconfigure`, overlaid with the runtime
registrations of the `registry` file), and sends the request to a model replica with
`multiplexed_model_id="id@version"` and the adapter's location, so that Serve routes it to a replica that
already holds that adapter version (app.py).
"""

# No `from __future__ import annotations` here: Serve rebuilds the route functions of a class-based ingress,
# and FastAPI must see `Request` as a class, not as a string it can no longer resolve.
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
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

from serving import registry
from serving.config import ADAPTER_ID, adapter_roots, is_uri

log = logging.getLogger(__name__)
# How often an ingress re-reads the registry file for registrations made through another ingress replica
# (an unknown id re-reads it at once, at most every MISS_REFRESH_S).
POLL_S = 2.0
MISS_REFRESH_S = 0.5


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


def _from_loopback(request: Request) -> bool:
    """Whether the client is on this machine (Serve's proxy passes the client's address through)."""
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@serve.ingress(app)
class OpenAIIngress:
    """OpenAI-compatible routes in front of the model deployment."""

    def __init__(self, model: Any, settings: dict[str, Any]) -> None:
        self.model = model  # handle of the model deployment
        self.base_name: str = settings["base_name"]
        self.keys: list[dict[str, Any]] = settings["keys"]
        self.max_body: int = settings["max_body_bytes"]
        self.extra_roots: list[str] = list(settings["adapter_roots"])
        self.registry_file: str | None = settings.get("registry")
        self.roots = adapter_roots({}, self.extra_roots)
        self._config: dict[str, dict[str, Any]] = {}  # from the user_config
        self._runtime: dict[str, Any] = registry.empty()  # from the registry file
        self._served: dict[str, dict[str, Any]] = {}  # what requests see: the two overlaid
        self._last_read = 0.0
        self._write_lock = asyncio.Lock()  # one read-modify-write of the registry at a time (per replica)
        self._read_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    # ---- the served set
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and whenever the deployment's user_config changes (a RayService
        update, a redeploy): no restart, requests keep flowing. `{"adapters": {id: location}}`."""
        adapters = dict((user_config or {}).get("adapters") or {})
        for aid, location in adapters.items():
            if not isinstance(location, str) or not ADAPTER_ID.fullmatch(str(aid)) or aid in (".", ".."):
                raise ValueError(f"user_config.adapters.{aid}: give an adapter id (a name) -> a location")
            if not is_uri(location) and not Path(location).is_absolute():
                raise ValueError(
                    f"user_config.adapters.{aid}: {location} is a relative path; give an absolute path on "
                    "the replicas' volume or a URI (s3://...)"
                )
            if aid == self.base_name:
                raise ValueError(f"user_config.adapters.{aid}: this id is the base model's name; rename it")
        self._config = await asyncio.to_thread(registry.configured, adapters)
        self.roots = adapter_roots(adapters, self.extra_roots)
        await self._refresh()
        log.info("serving %d configured adapter(s): %s", len(adapters), ", ".join(sorted(adapters)) or "-")
        if self.registry_file and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _refresh(self) -> None:
        """Re-read the registry file (a failure keeps the last known registrations) and recompute."""
        if self.registry_file:
            try:
                self._runtime = await asyncio.to_thread(registry.read, self.registry_file)
            except Exception as e:
                log.warning("adapter registry %s: cannot read it: %s", self.registry_file, e)
        self._served = registry.served(self._config, self._runtime)
        self._last_read = time.monotonic()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            with contextlib.suppress(Exception):
                await self._refresh()

    async def _lookup(self, model_id: str) -> dict[str, Any] | None:
        entry = self._served.get(model_id)
        if entry is None and self.registry_file:  # maybe registered through another ingress replica
            async with self._read_lock:
                if time.monotonic() - self._last_read > MISS_REFRESH_S:
                    await self._refresh()
            entry = self._served.get(model_id)
        return entry

    # ---- access
    def _key(self, request: Request, admin: bool = False) -> dict[str, Any] | None:
        """The caller's key entry (None when the server has no keys). 401 without a valid key."""
        if not self.keys:
            if admin and not _from_loopback(request):
                raise ApiError(
                    "this server has no API keys, so adapters may be registered and deleted only from the "
                    "machine it runs on; configure an admin key (`api_keys` in the serve YAML)",
                    403,
                    code="admin_required",
                )
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

    def _known(self, key: dict[str, Any] | None) -> list[str]:
        ids = [self.base_name, *sorted(self._served)]
        return [i for i in ids if self._allowed(key, i)]

    async def _entry(self, model_id: str, key: dict[str, Any] | None) -> dict[str, Any] | None:
        """The served entry of `model_id` (None: the base). 404 listing known ids, 403 if not allowed."""
        entry = None if model_id == self.base_name else await self._lookup(model_id)
        if model_id != self.base_name and entry is None:
            known = self._known(key)
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
        entries = self._served
        cards = [self._model_card(self.base_name, None)]
        cards += [self._model_card(i, entries[i]) for i in sorted(entries)]
        return {"object": "list", "data": [c for c in cards if self._allowed(key, c["id"])]}

    @app.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        key = self._key(request)
        return self._model_card(model_id, await self._entry(model_id, key))

    # ---- adapters (admin)
    def _under_roots(self, raw: str) -> str:
        """The location `raw` names (absolute, a URI, or relative to a root) if it lies under a root."""
        if "\x00" in raw or not raw.strip():
            raise ApiError("`path` must be a directory path or a URI", 400, "path")
        local_roots = [Path(r) for r in self.roots if not is_uri(r)]
        uri_roots = [r for r in self.roots if is_uri(r)]
        if is_uri(raw):
            local, uris = [], [raw.rstrip("/")]
        elif Path(raw).is_absolute():
            local, uris = [Path(raw)], []
        else:
            local = [root / raw for root in local_roots]
            uris = [f"{root}/{raw.rstrip('/')}" for root in uri_roots]
        for candidate in local:
            resolved = candidate.resolve()  # symlinks resolved: a link cannot lead out of a root
            if any(resolved.is_relative_to(root) for root in local_roots) and resolved.is_dir():
                return str(resolved)
        for uri in uris:
            if uri.startswith("file://"):  # a local folder after all: resolve links as above
                resolved = Path(uri[len("file://") :]).resolve()
                roots = [Path(r[len("file://") :]).resolve() for r in uri_roots if r.startswith("file://")]
                if any(resolved.is_relative_to(r) for r in roots):
                    return f"file://{resolved}"
                continue
            dots = {".", ".."} & set(uri.split("://", 1)[1].split("/"))
            if not dots and any(uri.startswith(r + "/") for r in uri_roots):
                return uri
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
        if not ADAPTER_ID.fullmatch(body.id) or body.id in (".", ".."):
            raise ApiError("`id` must be a name of letters, digits, `.`, `_`, `-` (not a path)", 400, "id")
        if body.id == self.base_name:
            raise ApiError(f"`id` {body.id} is the base model's name; choose another", 409, "id")
        registry_file = self._registry_file()
        location = self._under_roots(body.path)
        try:  # a trial load on a replica: a wrong base or a broken adapter is refused now, not per request
            info = await self.model.check_adapter.remote(location)
        except Exception as e:
            raise as_api_error(e) from None
        async with self._write_lock:
            runtime = await self._read_fresh(registry_file)
            replaced = body.id in registry.served(self._config, runtime)
            entry = await asyncio.to_thread(
                registry.register, runtime, self._config, body.id, location, info["method"]
            )
            await self._save(registry_file, runtime)
        return {**self._model_card(body.id, entry), "version": entry["version"], "replaced": replaced}

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(self, adapter_id: str, request: Request) -> dict[str, Any]:
        key = self._key(request, admin=True)
        registry_file = self._registry_file()
        async with self._write_lock:
            runtime = await self._read_fresh(registry_file)
            if adapter_id not in registry.served(self._config, runtime):
                known = [i for i in self._known(key) if i != self.base_name]
                raise ApiError(
                    f"adapter `{adapter_id}` does not exist; known: {', '.join(known) or 'none'}",
                    404,
                    "id",
                    "model_not_found",
                )
            registry.unregister(runtime, self._config, adapter_id)
            await self._save(registry_file, runtime)
        return {"id": adapter_id, "object": "model", "deleted": True}

    def _registry_file(self) -> str:
        if not self.registry_file:
            raise ApiError(
                "runtime registration is off: it needs `registry:` in the serve YAML (a file on a volume "
                "every replica sees, or a URI such as s3://bucket/serve/registry.json) so that it outlives "
                "replicas. Or add the adapter to `adapters:` and update the deployment",
                409,
                code="registry_not_configured",
            )
        return self.registry_file

    async def _read_fresh(self, registry_file: str) -> dict[str, Any]:
        try:  # fresh, so that registrations made through another ingress replica are kept
            return await asyncio.to_thread(registry.read, registry_file)
        except Exception as e:
            raise ApiError(f"adapter registry {registry_file}: cannot read it: {e}", 500) from None

    async def _save(self, registry_file: str, runtime: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(registry.write, registry_file, runtime)
        except Exception as e:
            raise ApiError(f"adapter registry {registry_file}: cannot write it: {e}", 500) from None
        self._runtime = runtime
        self._served = registry.served(self._config, runtime)
        self._last_read = time.monotonic()

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
