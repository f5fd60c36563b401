"""Drives keypool-worker's Gemini routes with Google's `google-genai` SDK.

Usage: genai_client.py BASE_URL TOKEN POOL [POOL ...]. Prints one JSON object with what the SDK
saw for each pool (plain, streamed, a function-calling loop, JSON output); the Rust test
(worker/tests/openai_client.rs) checks it.
"""

import json
import sys

from google import genai
from google.genai import types

base_url, token, pools = sys.argv[1], sys.argv[2], sys.argv[3:]
client = genai.Client(
    api_key=token,
    http_options=types.HttpOptions(base_url=base_url, headers={"X-Keypool-User": "py-genai"}),
)
weather = types.FunctionDeclaration(
    name="weather",
    description="The weather in a city",
    parameters_json_schema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
no_auto = types.AutomaticFunctionCallingConfig(disable=True)

seen = {"client_version": genai.__version__}
for pool in pools:
    out = seen.setdefault(pool, {})
    try:
        r = client.models.generate_content(model=pool, contents="hi", config=types.GenerateContentConfig(max_output_tokens=5))
        out["plain"] = [r.text, r.candidates[0].finish_reason.name]
        chunks = client.models.generate_content_stream(model=pool, contents="hi", config=types.GenerateContentConfig(max_output_tokens=5))
        out["stream"] = "".join(c.text or "" for c in chunks)
        config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[weather])], automatic_function_calling=no_auto)
        history = [types.Content(role="user", parts=[types.Part(text="What is the weather in Oslo?")])]
        first = client.models.generate_content(model=pool, contents=history, config=config)
        call = first.function_calls[0]
        history.append(first.candidates[0].content)
        history.append(types.Content(role="user", parts=[types.Part.from_function_response(
            name=call.name, response={"output": f"Sunny in {call.args['city']}"})]))
        if call.id:
            history[-1].parts[0].function_response.id = call.id
        second = client.models.generate_content(model=pool, contents=history, config=config)
        out["tools"] = [call.name, second.text]
        r = client.models.generate_content(model=pool, contents="a person", config=types.GenerateContentConfig(
            response_mime_type="application/json",
            response_json_schema={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
        out["json"] = json.loads(r.text)
    except Exception as e:  # the SDK's errors and anything else: reported, not raised
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
print(json.dumps(seen))
