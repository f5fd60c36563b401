// Real client libraries against keypool-worker: the official `openai` Node client and the AI SDK
// (`ai` with `@ai-sdk/openai`'s `.chat()` and `@ai-sdk/openai-compatible`), as apps use them,
// plain, streamed, multi-step tools with stopWhen, streamed tools and generateObject; and seed
// 000's own shape, an agent service calling generateText with tools for a user id; Anthropic's
// SDK; images.generate.
//
// Usage: node clients.mjs <worker url> <token> <pool> [<pool> ...]
// Prints one JSON object: for each pool, what each case saw (or the error it ended with).
// worker/tests/clients.rs runs it and asserts what it prints.

import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [url, token, ...pools] = process.argv.slice(2);
const baseURL = `${url}/v1`;

const weather = tool({
  description: "The weather in a city",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => `Sunny in ${city}`,
});
const person = z.object({ name: z.string(), age: z.number().int() });
const weatherTool = {
  type: "function",
  function: {
    name: "weather",
    description: "The weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

// What an error tells a caller: the HTTP status and the error body's code, if any.
function failure(e) {
  return { error: String(e?.message ?? e).slice(0, 500), status: e?.status ?? e?.statusCode ?? null,
           code: e?.code ?? e?.error?.code ?? e?.data?.error?.code ?? null };
}

async function run(name, f, out) {
  try {
    out[name] = await f();
  } catch (e) {
    out[name] = failure(e);
  }
}

// Seed 000's agent service, on the pool instead of one hard-coded key: generateText with the
// app's tools and stopWhen for a user id; a user past their share is told so. (The worker tries
// other keys itself, and a QUOTA_EXCEEDED does not clear before the day ends: no client retries.)
class AgentService {
  constructor(pool) {
    this.pool = pool;
  }

  model(user) {
    const provider = createOpenAI({ baseURL, apiKey: token, headers: { "X-Keypool-User": user.id } });
    return provider.chat(this.pool);
  }

  async chat(request, user) {
    try {
      const result = await generateText({
        model: this.model(user),
        system: "You are a helpful assistant",
        prompt: request.message,
        temperature: 0.7,
        maxRetries: 0,
        tools: request.tools,
        stopWhen: request.stopWhen,
      });
      return { message: result.text, steps: result.steps.length };
    } catch (e) {
      const code = e?.data?.error?.code;
      if (e?.statusCode === 429 && code === "QUOTA_EXCEEDED") {
        return { message: `Daily request limit reached. ${e.data.error.message}`, retryAfter: e.responseHeaders?.["retry-after"] };
      }
      throw e;
    }
  }
}

async function casesFor(pool) {
  const out = {};
  const user = `client-${pool}`;
  const client = new OpenAI({ baseURL, apiKey: token, maxRetries: 0 });
  const aisdk = createOpenAI({ baseURL, apiKey: token, headers: { "X-Keypool-User": user } });
  const compat = createOpenAICompatible({
    name: "keypool", baseURL, apiKey: token, headers: { "X-Keypool-User": user },
    includeUsage: true, supportsStructuredOutputs: true,
  });

  await run("openai_plain", async () => {
    const r = await client.chat.completions.create({ model: pool, user, messages: [{ role: "user", content: "hi" }], max_tokens: 5 });
    return { content: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: [r.usage.prompt_tokens, r.usage.completion_tokens] };
  }, out);

  await run("openai_stream", async () => {
    const stream = await client.chat.completions.create({
      model: pool, user, messages: [{ role: "user", content: "hi" }], max_tokens: 5, stream: true, stream_options: { include_usage: true },
    });
    let content = "", usage = null, finish = null;
    for await (const chunk of stream) {
      content += chunk.choices[0]?.delta?.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
      if (chunk.usage) usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens];
    }
    return { content, finish, usage };
  }, out);

  await run("openai_tools", async () => {
    const messages = [{ role: "user", content: "What is the weather in Oslo?" }];
    const first = await client.chat.completions.create({ model: pool, user, messages, tools: [weatherTool] });
    const call = first.choices[0].message.tool_calls[0];
    messages.push(first.choices[0].message, { role: "tool", tool_call_id: call.id, content: `Sunny in ${JSON.parse(call.function.arguments).city}` });
    const second = await client.chat.completions.create({ model: pool, user, messages, tools: [weatherTool] });
    return { called: call.function.name, finish: first.choices[0].finish_reason, content: second.choices[0].message.content };
  }, out);

  await run("openai_stream_tools", async () => {
    const messages = [{ role: "user", content: "What is the weather in Oslo?" }];
    const first = await client.chat.completions.stream({ model: pool, user, messages, tools: [weatherTool] }).finalChatCompletion();
    const call = first.choices[0].message.tool_calls[0];
    messages.push(first.choices[0].message, { role: "tool", tool_call_id: call.id, content: `Sunny in ${JSON.parse(call.function.arguments).city}` });
    const second = await client.chat.completions.stream({ model: pool, user, messages, tools: [weatherTool] }).finalChatCompletion();
    return { called: call.function.name, finish: first.choices[0].finish_reason, content: second.choices[0].message.content };
  }, out);

  await run("aisdk_text", async () => {
    const r = await generateText({ model: aisdk.chat(pool), prompt: "hi", maxOutputTokens: 5 });
    return { text: r.text, finish: r.finishReason, usage: [r.usage.inputTokens, r.usage.outputTokens] };
  }, out);

  await run("aisdk_stream", async () => {
    const r = streamText({ model: aisdk.chat(pool), prompt: "hi", maxOutputTokens: 5 });
    return { text: await r.text, finish: await r.finishReason };
  }, out);

  await run("aisdk_tools", async () => {
    const r = await generateText({ model: aisdk.chat(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?" });
    return { steps: r.steps.length, text: r.text, calls: r.steps[0].toolCalls.map((c) => [c.toolName, c.input]) };
  }, out);

  await run("aisdk_stream_tools", async () => {
    const r = streamText({ model: aisdk.chat(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?" });
    return { steps: (await r.steps).length, text: await r.text };
  }, out);

  await run("aisdk_object", async () => {
    const r = await generateObject({ model: aisdk.chat(pool), schema: person, prompt: "a person" });
    return { object: r.object };
  }, out);

  await run("compat_tools", async () => {
    const r = await generateText({ model: compat.chatModel(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?" });
    return { steps: r.steps.length, text: r.text };
  }, out);

  await run("compat_stream_tools", async () => {
    const r = streamText({ model: compat.chatModel(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?" });
    return { steps: (await r.steps).length, text: await r.text };
  }, out);

  // Reasoning on: the provider's signed reasoning rides in the tool call ids and must come back
  // with the next step (Anthropic refuses the step otherwise; Gemini 3 wants its signatures).
  await run("compat_reasoning_tools", async () => {
    const r = await generateText({
      model: compat.chatModel(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?",
      providerOptions: { keypool: { reasoningEffort: "low" } }, maxOutputTokens: 4096,
    });
    return { steps: r.steps.length, text: r.text, reasoning: r.steps[0].reasoningText ?? null };
  }, out);

  await run("compat_object", async () => {
    const r = await generateObject({ model: compat.chatModel(pool), schema: person, prompt: "a person" });
    return { object: r.object };
  }, out);

  // The Responses API: the AI SDK's default provider (seed 000's literal `openai(model)`) and the
  // official client's responses.create / responses.stream.
  await run("responses_text", async () => {
    const r = await generateText({ model: aisdk(pool), prompt: "hi", maxOutputTokens: 5 });
    return { text: r.text, finish: r.finishReason, usage: [r.usage.inputTokens, r.usage.outputTokens] };
  }, out);

  await run("responses_tools", async () => {
    const r = await generateText({ model: aisdk(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?" });
    return { steps: r.steps.length, text: r.text };
  }, out);

  await run("responses_stream_tools", async () => {
    const r = streamText({ model: aisdk(pool), tools: { weather }, stopWhen: stepCountIs(3), prompt: "What is the weather in Oslo?" });
    return { steps: (await r.steps).length, text: await r.text };
  }, out);

  await run("responses_object", async () => {
    const r = await generateObject({ model: aisdk(pool), schema: person, prompt: "a person" });
    return { object: r.object };
  }, out);

  await run("openai_responses", async () => {
    const r = await client.responses.create({ model: pool, input: "hi", max_output_tokens: 5, user });
    return { text: r.output_text, status: r.status };
  }, out);

  await run("openai_responses_stream", async () => {
    const stream = client.responses.stream({ model: pool, input: "hi", user });
    let deltas = "";
    stream.on("response.output_text.delta", (e) => { deltas += e.delta; });
    const r = await stream.finalResponse();
    const text = r.output.filter((i) => i.type === "message").flatMap((i) => i.content).map((c) => c.text).join("");
    return { text, deltas, status: r.status };
  }, out);

  // Anthropic's SDK (and Claude Code) against /v1/messages, the token as x-api-key.
  const anthropic = new Anthropic({ baseURL: url, apiKey: token, maxRetries: 0 });
  const weatherToolAnthropic = {
    name: "weather",
    description: "The weather in a city",
    input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  };
  const anthropicLoop = async (create) => {
    const messages = [{ role: "user", content: "What is the weather in Oslo?" }];
    const first = await create({ model: pool, max_tokens: 1024, tools: [weatherToolAnthropic], messages, metadata: { user_id: user } });
    const use = first.content.find((b) => b.type === "tool_use");
    messages.push({ role: "assistant", content: first.content });
    messages.push({ role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: `Sunny in ${use.input.city}` }] });
    const second = await create({ model: pool, max_tokens: 1024, tools: [weatherToolAnthropic], messages, metadata: { user_id: user } });
    return { stop: first.stop_reason, called: use.name, text: second.content.filter((b) => b.type === "text").map((b) => b.text).join("") };
  };

  await run("anthropic_plain", async () => {
    const m = await anthropic.messages.create({ model: pool, max_tokens: 5, messages: [{ role: "user", content: "hi" }], metadata: { user_id: user } });
    return { text: m.content.map((b) => b.text).join(""), stop: m.stop_reason, usage: [m.usage.input_tokens, m.usage.output_tokens] };
  }, out);

  await run("anthropic_stream", async () => {
    const stream = anthropic.messages.stream({ model: pool, max_tokens: 5, messages: [{ role: "user", content: "hi" }], metadata: { user_id: user } });
    let deltas = "";
    stream.on("text", (t) => { deltas += t; });
    const m = await stream.finalMessage();
    return { text: m.content.map((b) => b.text).join(""), deltas, stop: m.stop_reason };
  }, out);

  await run("anthropic_tools", () => anthropicLoop((p) => anthropic.messages.create(p)), out);
  await run("anthropic_stream_tools", () => anthropicLoop((p) => anthropic.messages.stream(p).finalMessage()), out);

  await run("seed000_agent", async () => {
    const service = new AgentService(pool);
    return await service.chat({ message: "What is the weather in Oslo?", tools: { weather }, stopWhen: stepCountIs(3) }, { id: `seed000-${pool}` });
  }, out);

  return out;
}

const results = {};
for (const pool of pools) {
  results[pool] = await casesFor(pool);
}
// A user past their share, through seed 000's service.
if (process.env.KEYPOOL_QUOTA_POOL) {
  const service = new AgentService(process.env.KEYPOOL_QUOTA_POOL);
  const user = { id: process.env.KEYPOOL_QUOTA_USER };
  const answers = [];
  for (let i = 0; i < 3; i++) {
    try {
      answers.push(await service.chat({ message: "hi" }, user));
    } catch (e) {
      answers.push(failure(e));
    }
  }
  results.quota = answers;
  // The same user through Anthropic's SDK: its RateLimitError, with the wait.
  const anthropic = new Anthropic({ baseURL: url, apiKey: token, maxRetries: 0 });
  try {
    await anthropic.messages.create({ model: process.env.KEYPOOL_QUOTA_POOL, max_tokens: 5,
                                      messages: [{ role: "user", content: "hi" }], metadata: { user_id: user.id } });
    results.anthropic_quota = { served: true };
  } catch (e) {
    results.anthropic_quota = { class: e?.constructor?.name, status: e?.status ?? null, type: e?.error?.error?.type ?? null,
                                retryAfter: e?.headers?.get?.("retry-after") ?? null };
  }
}
// Image generation with the official client: KEYPOOL_IMAGE_POOLS=pool,pool.
for (const pool of (process.env.KEYPOOL_IMAGE_POOLS ?? "").split(",").filter(Boolean)) {
  const client = new OpenAI({ baseURL, apiKey: token, maxRetries: 0 });
  await run(`images_${pool}`, async () => {
    const r = await client.images.generate({ model: pool, prompt: "a lighthouse", n: 2, response_format: "b64_json", user: "node-images" });
    return { count: r.data.length, png: r.data.every((d) => Buffer.from(d.b64_json, "base64").subarray(0, 4).toString("latin1") === "\x89PNG") };
  }, results);
}
console.log(JSON.stringify(results));
