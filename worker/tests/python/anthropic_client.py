"""Drives keypool-worker's /v1/messages with the official Anthropic Python SDK.

Usage: anthropic_client.py BASE_URL TOKEN POOL [POOL ...]. Prints one JSON object with what the
SDK saw for each pool (plain, streamed, a tool loop plain and streamed); the Rust test
(worker/tests/openai_client.rs) checks it.
"""

import json
import sys

import anthropic

base_url, token, pools = sys.argv[1], sys.argv[2], sys.argv[3:]
client = anthropic.Anthropic(base_url=base_url, api_key=token, max_retries=0)
WEATHER = {
    "name": "weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def text(message):
    return "".join(b.text for b in message.content if b.type == "text")


def streamed(**kwargs):
    with client.messages.stream(**kwargs) as s:
        return s.get_final_message()


def loop(pool, create):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = create(model=pool, max_tokens=1024, tools=[WEATHER], messages=messages, metadata={"user_id": "py-ant"})
    use = next(b for b in first.content if b.type == "tool_use")
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": f"Sunny in {use.input['city']}"}]},
    ]
    second = create(model=pool, max_tokens=1024, tools=[WEATHER], messages=messages, metadata={"user_id": "py-ant"})
    return [first.stop_reason, use.name, text(second)]


seen = {"client_version": anthropic.__version__}
for pool in pools:
    out = seen.setdefault(pool, {})
    try:
        m = client.messages.create(model=pool, max_tokens=5, messages=[{"role": "user", "content": "hi"}], metadata={"user_id": "py-ant"})
        out["plain"] = [text(m), m.stop_reason, m.usage.output_tokens]
        m = streamed(model=pool, max_tokens=5, messages=[{"role": "user", "content": "hi"}], metadata={"user_id": "py-ant"})
        out["stream"] = [text(m), m.stop_reason]
        out["tools"] = loop(pool, client.messages.create)
        out["stream_tools"] = loop(pool, streamed)
        out["count"] = client.messages.count_tokens(model=pool, messages=[{"role": "user", "content": "abcdefgh"}]).input_tokens
    except anthropic.APIError as e:
        out["error"] = str(e)[:400]
print(json.dumps(seen))
