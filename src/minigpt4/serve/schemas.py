"""OpenAI chat-completions request and response bodies (the subset this server speaks).

Requests are validated strictly: a string where a number belongs is an error, not a guess, and
every number must be finite and in the range OpenAI documents for it (NaN, Infinity and 1e999 are
refused while parsing). Every list and map has a bound that pydantic checks before validating its
items, so a body of a million wrong items costs one error, not a million (each error takes ~1 kB and
describing them took seconds). Fields the server cannot honour (tools, JSON mode, log-probabilities,
penalties) are refused with a message rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: str


class TooManyMessages(Exception):
    """The request holds more messages plus content parts than `max_messages` (raised before any is validated)."""

    def __init__(self, count: int, limit: int):
        super().__init__(f"the request has {count} messages and content parts; the limit is max_messages={limit}")
        self.count, self.limit = count, limit


def count_message_parts(messages: list) -> int:
    """Messages plus their content parts, counted on the raw JSON values (one pass, no validation)."""
    parts = len(messages)
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts += len(content)
    return parts


StopString = Annotated[str, Field(min_length=1, max_length=64)]


def _at_most(limit: int) -> WrapValidator:
    """A size bound checked before the items are validated (pydantic checks a dict's max_length only after)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, dict) and len(value) > limit:
            raise PydanticCustomError("too_long", "at most {limit} items, got {count}",
                                      {"limit": limit, "count": len(value)})
        return handler(value)

    return WrapValidator(check)


class ChatCompletionRequest(_Strict):
    """Validate with `context={"max_messages": N}` to refuse more than N messages plus content parts
    before validating any of them (validating 10^5 messages costs seconds; counting them, milliseconds)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None  # OpenAI: up to 4
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # what torch.manual_seed accepts
    user: str | None = None
    # Refused unless left at their neutral values; see `unsupported`.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict], Field(max_length=128)] | None = None  # OpenAI's limit
    tool_choice: str | dict | None = None
    functions: Annotated[list[dict], Field(max_length=128)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], _at_most(1024)] | None = None

    @field_validator("messages", mode="wrap")
    @classmethod
    def _count_before_validating(cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo):
        limit = (info.context or {}).get("max_messages")
        if limit is not None and isinstance(value, list):
            count = len(value) if len(value) > limit else count_message_parts(value)
            if count > limit:
                raise TooManyMessages(count, limit)  # not a ValueError: pydantic lets it through at once
        return handler(value)

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.presence_penalty:
            return "presence_penalty"
        if self.frequency_penalty:
            return "frequency_penalty"
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            return "tools"
        if self.logit_bias:
            return "logit_bias"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _field_path(loc: tuple) -> str:
    """'messages.0.content.0.text' from pydantic's location, without its union-branch labels."""
    parts: list[str] = []
    for item in map(str, loc):
        if "[" in item or item in _TYPE_LABELS or item.startswith("constrained-"):
            continue  # a union branch such as 'str', 'constrained-str' or 'list[tagged-union[...]]'
        if parts and parts[-1] == item:
            continue  # a tagged-union tag followed by the field of the same name ('text', 'text')
        parts.append(item)
    return ".".join(parts) or "body"


def _prefixes(path: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def describe_validation_error(err: ValidationError, limit: int = 3) -> str:
    """pydantic's errors as one line naming each field: 'messages.0.role: Input should be ...'."""
    by_field: dict[str, list[str]] = {}
    for item in err.errors(include_url=False):
        if item["type"] == "json_invalid":
            return f"the body is not valid JSON: {item['msg']}"
        messages = by_field.setdefault(_field_path(item["loc"]), [])
        if item["msg"] not in messages:
            messages.append(item["msg"])
    # A union reports every branch; where one branch got deeper (content -> content.0.text), that one is the news.
    # The set of every field's proper prefixes keeps this linear in the number of errors (a body can hold 10^5).
    deeper = {prefix for f in by_field for prefix in _prefixes(f)}
    fields = [f for f in by_field if f not in deeper]
    lines = [f"{field}: {' or '.join(by_field[field])}" for field in fields[:limit]]
    more = len(fields) - limit
    return "; ".join(lines) + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minigpt4"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
