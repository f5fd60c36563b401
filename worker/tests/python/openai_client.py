"""Drives keypool-worker's endpoint with the official OpenAI Python client.

Usage: openai_client.py BASE_URL TOKEN [POOL ...]. Prints one JSON object with what the client
saw; the Rust test (worker/tests/openai_client.rs) checks it. For each POOL: a tool call and its
answer, the same streamed, and structured output parsed into a pydantic model.
"""

import json
import sys

import openai
import pydantic
from openai import OpenAI

base_url, token, tool_pools = sys.argv[1], sys.argv[2], sys.argv[3:]
client = OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0)
messages = [{"role": "user", "content": "abcdefgh"}]
seen = {"client_version": openai.__version__}

answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=5, user="py-user")
seen["content"] = answer.choices[0].message.content
seen["finish_reason"] = answer.choices[0].finish_reason
seen["usage"] = [answer.usage.prompt_tokens, answer.usage.completion_tokens]

raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages, max_tokens=5, user="py-user")
seen["key_id_header"] = raw.headers.get("x-keypool-key-id")
seen["raw_content"] = raw.parse().choices[0].message.content

# A stream, read the way most apps do: chunk.choices[0] on every chunk.
pieces = []
for chunk in client.chat.completions.create(
    model="chat", messages=messages, max_tokens=5, user="py-user", stream=True
):
    pieces.append(chunk.choices[0].delta.content or "")
seen["streamed"] = "".join(pieces)

# A stream that asks for usage: the last chunk carries it.
usage = None
for chunk in client.chat.completions.create(
    model="chat",
    messages=messages,
    max_tokens=5,
    user="py-user",
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
seen["stream_usage"] = usage

seen["models"] = sorted(m.id for m in client.models.list())

try:
    OpenAI(base_url=base_url + "/v1", api_key="not-a-valid-token-000", max_retries=0).chat.completions.create(
        model="chat", messages=messages, user="py-user"
    )
except openai.AuthenticationError as e:
    seen["bad_token"] = [e.status_code, e.code]

try:
    client.chat.completions.create(model="no-such-pool", messages=messages, user="py-user")
except openai.NotFoundError as e:
    seen["unknown_model"] = [e.status_code, e.code]

# With the client's own retries on (its default): a QUOTA_EXCEEDED says not to retry
# (x-should-retry: false), so the client asks once, not three times.
retrying = OpenAI(base_url=base_url + "/v1", api_key=token)
try:
    for _ in range(3):
        retrying.chat.completions.create(model="tight", messages=messages, max_tokens=5, user="tight-user")
except openai.RateLimitError as e:
    seen["quota"] = [e.status_code, e.code, e.response.headers.get("retry-after") is not None]

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Person(pydantic.BaseModel):
    name: str
    age: int


def two_steps(pool, create):
    """A tool call, the app's answer, and the model's text after it."""
    history = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = create(model=pool, messages=history, tools=[WEATHER], user="py-agent")
    call = first.choices[0].message.tool_calls[0]
    city = json.loads(call.function.arguments)["city"]
    history += [first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": f"Sunny in {city}"}]
    second = create(model=pool, messages=history, tools=[WEATHER], user="py-agent")
    return [call.function.name, first.choices[0].finish_reason, second.choices[0].message.content]


def streamed(**kwargs):
    with client.chat.completions.stream(**kwargs) as s:
        return s.get_final_completion()


# Images of a pool whose key makes 2 a minute: two, then a refusal with the wait.
images = []
for _ in range(3):
    try:
        r = client.images.generate(model="img", prompt="a cat", user="py-images")
        images.append(len(r.data[0].b64_json or "") > 0)
    except openai.RateLimitError as e:
        images.append([e.status_code, e.code, e.response.headers.get("retry-after") is not None])
seen["images"] = images

for pool in tool_pools:
    out = seen.setdefault("pools", {}).setdefault(pool, {})
    try:
        out["tools"] = two_steps(pool, client.chat.completions.create)
        out["stream_tools"] = two_steps(pool, streamed)
        parsed = client.chat.completions.parse(
            model=pool, messages=[{"role": "user", "content": "a person"}], response_format=Person, user="py-agent"
        )
        out["parsed"] = parsed.choices[0].message.parsed.model_dump()
    except openai.APIError as e:
        out["error"] = [getattr(e, "status_code", None), str(e)[:400]]

print(json.dumps(seen))
