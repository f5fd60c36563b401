"""Drives keypool-worker's endpoint with the official OpenAI Python client.

Usage: openai_client.py BASE_URL TOKEN. Prints one JSON object with what the client saw; the
Rust test (worker/tests/openai_client.rs) checks it.
"""

import json
import sys

import openai
from openai import OpenAI

base_url, token = sys.argv[1], sys.argv[2]
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

try:
    for _ in range(3):
        client.chat.completions.create(model="tight", messages=messages, max_tokens=5, user="tight-user")
except openai.RateLimitError as e:
    seen["quota"] = [e.status_code, e.code, e.response.headers.get("retry-after") is not None]

print(json.dumps(seen))
