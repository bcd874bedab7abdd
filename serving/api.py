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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics, registry
from serving.config import adapter_roots, is_uri, valid_id
from serving.constrained import GrammarError, parse_tool_calls, response_format_grammar, tools_grammar
from serving.types import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOPS
from trainers.validation import explain

log = logging.getLogger(__name__)
# How often an ingress re-reads the registry file for registrations made through another ingress replica
# (an unknown id re-reads it at once, at most every MISS_REFRESH_S).
POLL_S = 2.0
MISS_REFRESH_S = 0.5
HEALTH_TIMEOUT_S = 2.0


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
MAX_CHOICES = 128  # prompts x n in one request (OpenAI's n is at most 128)
MAX_DEPTH = 64  # nesting of the JSON body (a JSON schema nests a few levels; a bomb nests thousands)
MAX_LOGIT_BIAS = 1024
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what a 64-bit generator takes; sent on as seed mod 2**64
# Accepted and ignored: fields real clients send that change nothing here.
IGNORED = ("user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key",
           "parallel_tool_calls", "reasoning_effort", "modalities", "prediction")  # fmt: skip


class _Body(BaseModel):
    # Unknown fields are errors rather than silently ignored: a typo in `max_tokens` must not pass.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # continuous_usage_stats and the like: no harm
    include_usage: bool = True


class JsonSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is json_schema")
        return self


class _Sampling(_Body):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    user: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    parallel_tool_calls: Any = None
    reasoning_effort: Any = None
    modalities: Any = None
    prediction: Any = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(f"at most {MAX_STOPS} stop sequences", 400, "stop")
        for s in stops:
            if not s:
                raise ApiError("stop sequences must not be empty", 400, "stop")
            if len(s) > MAX_STOP_CHARS:
                raise ApiError(f"a stop sequence is at most {MAX_STOP_CHARS} characters", 400, "stop")
        return stops

    def bias(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit() or not -100 <= value <= 100 or value != value:
                raise ApiError(
                    f"`logit_bias` maps token ids (strings of digits) to numbers in [-100, 100]; got "
                    f"{key!r}: {value!r}",
                    400,
                    "logit_bias",
                )
            out[int(key)] = float(value)
        return out

    def grammar(self) -> str | None:
        try:
            return response_format_grammar(
                self.response_format.model_dump(by_alias=True) if self.response_format else None
            )
        except GrammarError as e:
            raise ApiError(str(e), 400, "response_format") from None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts: texts, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif not p:
            raise ApiError("`prompt` is an empty list", 400, "prompt")
        elif all(isinstance(x, int) for x in p):
            out = [list(p)]  # type: ignore[arg-type]
        else:
            out = list(p)  # type: ignore[arg-type]
        if any(not x for x in out):
            raise ApiError("`prompt` is empty", 400, "prompt")
        if any(isinstance(x, list) and min(x) < 0 for x in out):
            raise ApiError("`prompt` token ids must not be negative", 400, "prompt")
        if len(out) * self.n > MAX_CHOICES:
            raise ApiError(f"prompts x n is over {MAX_CHOICES}; split the request", 400, "n")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError("`best_of` other than `n` is not supported", 400, "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError("`max_tokens` 0 needs `echo` (a prompt's log-probabilities)", 400, "max_tokens")
        return out


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: Any = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content or [])
        out: dict[str, Any] = {"role": self.role, "content": text}
        if self.tool_calls:  # what chat templates expect: arguments as an object
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    max_tokens: int | None = Field(None, ge=1)

    def tool_list(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
                raise ApiError("`tool_choice` needs `tools`", 400, "tool_choice")
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if named is not None and named not in {t.function.name for t in self.tools}:
            raise ApiError(f"`tool_choice` names `{named}`, which is not in `tools`", 400, "tool_choice")
        return tools

    def choice(self) -> Any:
        return self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice

    def tool_grammar(self, tools: list[dict[str, Any]] | None) -> str | None:
        try:
            return tools_grammar(tools, self.choice())
        except GrammarError as e:
            raise ApiError(str(e), 400, "tools") from None


class RegisterRequest(_Body):
    id: str = Field(max_length=256)
    path: str = Field(max_length=4096)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """A field path from pydantic's error location, without its union-member names (`list[TextPart]`)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or "(" in p or p in _TYPE_NAMES))]
    return ".".join(parts) or None


def _parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object", 400)
    try:
        return model.model_validate(data)
    except ValidationError as e:  # one explanation for the spec, the serve YAML and the API
        loc, msg = explain(e, model, data)
        param = _param(loc)
        raise ApiError(f"`{param}`: {msg}" if param else msg, 400, param, code="invalid_value") from None


def _check_tree(data: Any) -> None:
    """Nesting depth and text that can be encoded (a lone surrogate, from a `\\ud800` escape, cannot):
    400 naming the field, before anything else looks at the body."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise ApiError(f"the JSON body nests deeper than {MAX_DEPTH} levels", 400, _param(path[:3]))
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, path)
                stack.append((v, (*path, k)))
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple[Any, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field = _param(path) or "body"
        raise ApiError(
            f"`{field}` holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair); send valid Unicode",
            400,
            _param(path),
            code="invalid_value",
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --------------------------------------------------------------------------- the ingress
app = FastAPI(title="fulcrum", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    # One line per client error (no traceback): the operator sees what was refused and why.
    level = logging.WARNING if e.status >= 500 else logging.INFO
    log.log(level, "%d %s %s: %s", e.status, request.method, request.url.path, e.message)
    return e.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return ApiError(f"{request.method} {request.url.path}: {e.detail}", e.status_code).response()


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (n choices must differ), as a 64-bit value."""
    return None if seed is None else (seed + choice) % (1 << 64)


def _legacy_logprobs(entries: list[dict[str, Any] | None], offset: int) -> dict[str, Any]:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs (the chosen token's and the k
    best, as a dict), text_offset (from `offset`, the choice text's start)."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        assert e is not None
        tokens.append(e["token"])
        lps.append(e["logprob"])
        top = None
        if e["logprob"] is not None:  # the chosen token first: a best token of the same text wins
            top = {e["token"]: e["logprob"], **{t: lp for t, _, lp in e["top"]}}
        tops.append(top)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    content = [
        {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e["top"]]}
        for e in entries
    ]  # fmt: skip
    return {"content": content, "refusal": None}


class _Choice:
    """One choice being answered: its stream from a replica and what it has said so far."""

    def __init__(self, index: int, stream: Any, head: dict[str, Any], logprobs: bool) -> None:
        self.index, self.stream, self.head, self.logprobs = index, stream, head, logprobs
        self.text: list[str] = []
        self.entries: list[dict[str, Any]] = []
        self.count = 0
        self.finish: str | None = None

    def add(self, batch: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        text = "".join(e["text"] for e in batch)
        entries = [e["lp"] for e in batch if e.get("lp") is not None]
        self.text.append(text)
        self.entries.extend(entries)
        self.count += sum(1 for e in batch if not e.get("none"))
        if batch and batch[-1]["finish_reason"]:
            self.finish = batch[-1]["finish_reason"]
        return text, entries

    def echo(self) -> tuple[str, list[dict[str, Any]]]:
        echo = self.head.get("echo") or {}
        return echo.get("text", ""), echo.get("logprobs") or []


async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, list[dict[str, Any]]]]:
    """The batches of every choice's stream, as they come."""
    if len(choices) == 1:
        async for batch in choices[0].stream:
            yield choices[0], batch
        return
    queue: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()
    done = object()

    async def pump(c: _Choice) -> None:
        try:
            async for batch in c.stream:
                await queue.put((c, batch))
            await queue.put((c, done))
        except Exception as e:
            await queue.put((c, e))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            c, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for t in tasks:
            t.cancel()


def _tool_message(text: str, tools: list[dict[str, Any]], forced: bool) -> tuple[dict[str, Any], bool]:
    """(the assistant message, whether it holds tool calls) for an answer to a request with tools."""
    calls = parse_tool_calls(text, tools, forced)
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, True
    return {"role": "assistant", "content": text}, False


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
            if not isinstance(location, str) or not valid_id(str(aid)):
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
            data = json.loads(b"".join(chunks) or b"null", parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is NaN here
            raise ApiError(f"malformed JSON body: {e}", 400, code="invalid_json") from None
        except RecursionError:
            raise ApiError(
                f"the JSON body nests deeper than {MAX_DEPTH} levels", 400, code="invalid_json"
            ) from None
        _check_tree(data)
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
                self._files_within(str(resolved), [str(r) for r in local_roots])
                return str(resolved)
            if candidate.is_dir() and any(candidate.absolute().is_relative_to(r) for r in local_roots):
                raise ApiError(
                    f"`path` {raw} resolves to {resolved}, outside the adapter roots; copy the adapter under "
                    "a root, or add its folder with --adapter-root",
                    403,
                    "path",
                    "outside_roots",
                )
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

    @staticmethod
    def _files_within(path: str, roots: list[str]) -> None:
        """403 when a file the replicas would read from `path` is a link out of every root."""
        from serving.adapters import check_within_roots
        from serving.types import AdapterError

        try:
            check_within_roots(path, roots)
        except AdapterError as e:
            raise ApiError(str(e), getattr(e, "status", 403), "path", "outside_roots") from None

    @app.post("/v1/adapters")
    async def register_adapter(self, request: Request) -> dict[str, Any]:
        self._key(request, admin=True)
        body: RegisterRequest = await self._body(request, RegisterRequest)
        if not valid_id(body.id):
            raise ApiError(
                "`id` must be a name of at most 128 letters, digits, `.`, `_`, `-` (not a path, not `.` "
                "or `..`)",
                400,
                "id",
            )
        if body.id == self.base_name:
            raise ApiError(f"`id` {body.id} is the base model's name; choose another", 409, "id")
        registry_file = self._registry_file()
        location = await asyncio.to_thread(self._under_roots, body.path)  # it looks at the disk
        try:  # a trial load on a replica: a wrong base or a broken adapter is refused now, not per request
            info = await self.model.check_adapter.remote(location)
        except Exception as e:
            raise as_api_error(e) from None
        if "error" in info:
            err = info["error"]
            raise ApiError(err["message"], err["status"], "path", err.get("code"))
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

    # ---- health and metrics (open, as vLLM's: probes and Prometheus carry no keys)
    @app.get("/health")
    async def health(self) -> Any:
        """200 once a model replica has its base loaded (a replica exists only after that), else 503."""
        try:
            await asyncio.wait_for(self.model.ready.remote(), HEALTH_TIMEOUT_S)
        except Exception:
            body = {"status": "loading", "detail": "no model replica is ready yet (the base is loading)"}
            return JSONResponse(body, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(self) -> Any:
        from fastapi.responses import PlainTextResponse

        app_name = serve.get_replica_context().app_name
        snaps = await asyncio.to_thread(metrics.collect, app_name)
        if not any(s["live"] for s in snaps):  # no live replica has published yet: wake one
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.model.ready.remote(), HEALTH_TIMEOUT_S)
                await asyncio.sleep(metrics.PUBLISH_S * 1.5)
                snaps = await asyncio.to_thread(metrics.collect, app_name)
        return PlainTextResponse(metrics.render(snaps), media_type="text/plain; version=0.0.4")

    # ---- generation
    def _common(self, body: _Sampling) -> dict[str, Any]:
        return {
            "model": body.model, "temperature": body.temperature, "top_p": body.top_p,
            "stop": body.stop_list(), "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "logit_bias": body.bias(),
        }  # fmt: skip

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        key = self._key(request)
        body: CompletionRequest = await self._body(request, CompletionRequest)
        common = self._common(body)
        prompts = body.prompts()
        common.update(
            max_tokens=16 if body.max_tokens is None else body.max_tokens, logprobs=body.logprobs,
            echo=body.echo, grammar=body.grammar(),
        )  # fmt: skip
        jobs = []
        for p in prompts:
            for c in range(body.n):
                jobs.append({**common, "seed": _seed(body.seed, c),
                             ("prompt" if isinstance(p, str) else "prompt_ids"): p})  # fmt: skip
        return await self._generate(body, jobs, key, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        key = self._key(request)
        body: ChatRequest = await self._body(request, ChatRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError("`top_logprobs` needs `logprobs: true`", 400, "top_logprobs")
        tools = body.tool_list()
        choice = body.choice()
        grammar = body.tool_grammar(tools) if tools else None
        common = self._common(body)
        common.update(
            messages=[m.as_dict() for m in body.messages],
            tools=tools if choice != "none" else None,
            # No max_tokens: answer up to the context length (the replica knows it).
            max_tokens=body.max_completion_tokens or body.max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            grammar=grammar or body.grammar(),
        )
        jobs = [{**common, "seed": _seed(body.seed, c)} for c in range(body.n)]
        tool_mode = None if not tools or choice == "none" else ("forced" if grammar else "auto")
        return await self._generate(body, jobs, key, chat=True, tools=tools, tool_mode=tool_mode)

    async def _open(self, handle: Any, index: int, job: dict[str, Any]) -> _Choice:
        """Start one choice on a replica and wait for its head (the prompt's size, and its echo): the
        replica's checks answer by then, so that its errors are still HTTP errors."""
        stream = handle.generate.remote(job)
        events = stream.__aiter__()
        try:
            head = await events.__anext__()
        except Exception as e:
            raise as_api_error(e) from None
        if "error" in head:
            err = head["error"]
            raise ApiError(err["message"], err["status"], err.get("param"), err.get("code"))
        return _Choice(index, events, head, job["logprobs"] is not None)

    async def _generate(
        self, body: _Sampling, jobs: list[dict[str, Any]], key: Any, chat: bool,
        tools: list[dict[str, Any]] | None = None, tool_mode: str | None = None,
    ) -> Any:  # fmt: skip
        entry = await self._entry(body.model, key)
        for job in jobs:
            job["adapter_path"] = entry["path"] if entry else None
            job["adapter_roots"] = [r for r in self.roots if not is_uri(r)]
        mux = f"{body.model}@{entry['version']}" if entry else ""
        handle = (
            self.model.options(stream=True, multiplexed_model_id=mux)
            if mux
            else self.model.options(stream=True)
        )
        opened = await asyncio.gather(*(self._open(handle, i, j) for i, j in enumerate(jobs)),
                                      return_exceptions=True)  # fmt: skip
        failed = next((c for c in opened if isinstance(c, BaseException)), None)
        if failed is not None:
            for c in opened:
                if isinstance(c, _Choice):
                    with contextlib.suppress(Exception):
                        await c.stream.aclose()
            raise failed
        choices: list[_Choice] = list(opened)  # type: ignore[arg-type]
        n = body.n
        prompt_tokens = sum(c.head["prompt_tokens"] for c in choices if c.index % n == 0)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": body.model}
        if body.stream:
            usage = body.stream_options.include_usage if body.stream_options else True
            return StreamingResponse(
                self._stream(choices, prompt_tokens, meta, chat, usage, tools, tool_mode),
                media_type="text/event-stream",
            )
        try:
            async for c, batch in _merged(choices):
                c.add(batch)
        except Exception as e:
            raise as_api_error(e) from None
        count = sum(c.count for c in choices)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                 "total_tokens": prompt_tokens + count}  # fmt: skip
        out = []
        for c in choices:
            answer = "".join(c.text)
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": answer}
                finish = c.finish
                if tool_mode and tools:
                    message, called = _tool_message(answer, tools, tool_mode == "forced")
                    finish = "tool_calls" if called else finish
                logprobs = _chat_logprobs(c.entries) if c.logprobs else None
                out.append(
                    {"index": c.index, "message": message, "finish_reason": finish, "logprobs": logprobs}
                )
            else:
                echo_text, echo_entries = c.echo()
                logprobs = None
                if c.logprobs:
                    logprobs = _legacy_logprobs([*echo_entries, *c.entries], 0)
                finish = c.finish or "length"
                out.append({"index": c.index, "text": echo_text + answer, "finish_reason": finish,
                            "logprobs": logprobs})  # fmt: skip
        kind = "chat.completion" if chat else "text_completion"
        return {**meta, "object": kind, "choices": out, "usage": usage}

    async def _stream(
        self, choices: list[_Choice], prompt_tokens: int, meta: dict[str, Any], chat: bool, usage: bool,
        tools: list[dict[str, Any]] | None, tool_mode: str | None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """Server-sent events: per choice, chunks of the tokens made since the last one (a single token
        while the client keeps up), then (by default) a usage chunk, then [DONE]. With tools, a choice's
        answer is sent whole at its end (as tool_calls or as content)."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(c: _Choice, text: str | None, entries: list[Any], finish: str | None,
                  extra: dict[str, Any] | None = None) -> bytes:  # fmt: skip
            lp = None
            if chat:
                delta: dict[str, Any] = dict(extra or {})
                if text:
                    delta["content"] = text
                if c.logprobs and entries:
                    lp = _chat_logprobs(entries)
                choice = {"index": c.index, "delta": delta, "finish_reason": finish, "logprobs": lp}
            else:
                if c.logprobs and entries:
                    lp = _legacy_logprobs(entries, 0)
                choice = {"index": c.index, "text": text or "", "finish_reason": finish, "logprobs": lp}
            return _sse({**meta, "object": kind, "choices": [choice]})

        try:
            for c in choices:
                if chat:
                    yield chunk(c, None, [], None, {"role": "assistant", "content": ""})
                else:
                    text, entries = c.echo()
                    if text or entries:
                        yield chunk(c, text, entries, None)
            async for c, batch in _merged(choices):
                text, entries = c.add(batch)
                if tool_mode and tools:
                    if c.finish is None:
                        continue
                    message, called = _tool_message("".join(c.text), tools, tool_mode == "forced")
                    if called:
                        calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                        yield chunk(c, None, c.entries, "tool_calls", {"tool_calls": calls})
                    else:
                        yield chunk(c, message["content"], c.entries, c.finish)
                    continue
                yield chunk(c, text, entries, batch[-1]["finish_reason"] if batch else None)
        except Exception as e:  # headers are gone: the error goes into the stream as an error object
            err = as_api_error(e)
            yield _sse(
                {"error": {"message": err.message, "type": "server_error", "param": None, "code": err.code}}
            )
            return
        if usage:
            count = sum(c.count for c in choices)
            counts = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                      "total_tokens": prompt_tokens + count}  # fmt: skip
            yield _sse({**meta, "object": kind, "choices": [], "usage": counts})
        yield _sse("[DONE]")
