"""The side-by-side run of bench/vs-litellm.sh: the same requests through keypool-worker and
through LiteLLM's proxy, against the same mock provider, in one run.

(a) Exactness: each experiment has its own two keys of `rpm` requests per minute (so that no
experiment inherits another's windows) and sends 60 requests, spread round-robin over the
gateway's replicas: all at once (burst), evenly over 15 s (spread), or half just before a clock
minute turns and half just after (boundary). What reached the provider is read from the mock's
call log: for each key, the most calls in any 60 s; the overshoot is what those exceed the key's
limit by, summed over the keys. A provider enforcing its per-minute limit would have refused
exactly those calls (or worse, counted them against the account).

(b) Throughput and latency: wrk at 1 and 64 connections against the mock directly, one
keypool-worker and one LiteLLM replica (limits out of reach), in alternating rounds.

Called by bench/vs-litellm.sh with a JSON plan on stdin; prints the tables (Markdown) and ends
with `keypool-worker overshoot: N (LiteLLM: a, b, ...)`.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

BODY = {
    "messages": [{"role": "user", "content": "Say something short about key pools."}],
    "max_tokens": 16,
}


async def send(client, url, model, auth, user):
    body = dict(BODY, model=model, user=user)
    try:
        r = await client.post(
            url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer " + auth, "X-Keypool-User": user},
        )
        return r.status_code
    except httpx.HTTPError:
        return 0


async def at(when, coro):
    """Runs `coro` at wall time `when` (seconds since the epoch)."""
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    return await coro


def schedule(pattern, n, start):
    """Wall times at which the n requests of an experiment are sent."""
    if pattern == "burst":
        return [start] * n
    if pattern == "spread":
        return [start + 15.0 * i / n for i in range(n)]
    if pattern == "boundary":
        # `start` is the minute boundary: half 1.5 s before it, half 0.5 s after.
        half = n // 2
        return [start - 1.5] * half + [start + 0.5] * (n - half)
    raise ValueError(pattern)


async def run_experiment(client, exp, start):
    times = schedule(exp["pattern"], exp["requests"], start)
    urls = exp["urls"]
    tasks = [
        at(t, send(client, urls[i % len(urls)], exp["model"], exp["auth"], f"user-{i}"))
        for i, t in enumerate(times)
    ]
    statuses = await asyncio.gather(*tasks)
    exp["statuses"] = statuses
    exp["first_ms"] = int(min(times) * 1000) - 1000


def next_boundary(min_lead=3.0):
    now = time.time()
    b = (int(now // 60) + 1) * 60
    if b - now < min_lead:
        b += 60
    return float(b)


async def exactness(plan):
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        for exp in plan["experiments"]:
            if exp["pattern"] != "boundary":
                await run_experiment(client, exp, time.time() + 0.2)
        # Boundary experiments: the single-replica pair at one minute boundary, the
        # three-replica pair at the next, both gateways at the same instant.
        for replicas in sorted({e["replicas"] for e in plan["experiments"]}):
            group = [e for e in plan["experiments"] if e["pattern"] == "boundary" and e["replicas"] == replicas]
            if not group:
                continue
            b = next_boundary()
            await asyncio.gather(*(run_experiment(client, e, b) for e in group))
    # Settlements and LiteLLM's own bookkeeping are asynchronous; the calls themselves have all
    # been answered, so the log is complete.
    time.sleep(0.5)


def received(log_path):
    """Chat calls per masked key, and other calls made with the keys (LiteLLM lists each
    deployment's models with its key when it starts)."""
    calls, other = {}, {}
    with open(log_path) as f:
        for line in f:
            try:
                c = json.loads(line)
            except ValueError:
                continue
            into = calls if c.get("path", "").endswith("/chat/completions") else other
            into.setdefault(c["key"], []).append(c["at_ms"])
    return calls, other


def most_in_a_minute(times):
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 60_000:
            j += 1
        best = max(best, i - j + 1)
    return best


def score(plan, received_calls):
    calls, other = received_calls
    rpm = plan["rpm"]
    for exp in plan["experiments"]:
        per_key = []
        together = []
        for tail in exp["key_tails"]:
            ts = [t for label, v in calls.items() if label.endswith(tail) for t in v]
            per_key.append(most_in_a_minute(ts))
            together += ts
        exp["other_calls"] = sum(len(v) for label, v in other.items() if any(label.endswith(t) for t in exp["key_tails"]))
        exp["reached"] = len(together)
        exp["max_minute"] = most_in_a_minute(together)
        exp["overshoot"] = sum(max(0, k - rpm) for k in per_key)
        exp["granted"] = sum(1 for s in exp["statuses"] if s == 200)
        exp["refused"] = sum(1 for s in exp["statuses"] if s == 429)
        exp["errors"] = len(exp["statuses"]) - exp["granted"] - exp["refused"]


WRK_LUA = r"""
local model = os.getenv("BENCH_MODEL")
local auth = "Bearer " .. os.getenv("BENCH_AUTH")
math.randomseed(os.time())
request = function()
    local user = "user-" .. math.random(1, 100000)
    local body = string.format(
        '{"model":"%s","user":"%s","max_tokens":16,"messages":[{"role":"user","content":"Say something short about key pools."}]}',
        model, user)
    return wrk.format("POST", "/v1/chat/completions",
        {["Content-Type"] = "application/json", ["Authorization"] = auth, ["X-Keypool-User"] = user}, body)
end
"""


def ms(v):
    if v.endswith("us"):
        return float(v[:-2]) / 1000
    if v.endswith("ms"):
        return float(v[:-2])
    if v.endswith("s"):
        return float(v[:-1]) * 1000
    return float(v)


def wrk(target, connections, seconds, lua_path):
    env = dict(os.environ, BENCH_MODEL=target["model"], BENCH_AUTH=target["auth"])
    threads = 1 if connections < 2 else 2
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
         "--latency", "-s", lua_path, target["url"]],
        env=env, capture_output=True, text=True, check=False,
    ).stdout
    rps, p50, total, errors = 0.0, 0.0, 0, 0
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            p50 = ms(parts[1])
        elif "requests in" in line:
            total = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            errors += int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            errors += sum(int(p.strip(",")) for p in parts[3::2])
    return {"rps": rps, "p50": p50, "total": total, "errors": errors}


def throughput(plan, workdir):
    lua = os.path.join(workdir, "chat.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    seconds = plan["seconds"]
    results = {}
    for rnd in range(plan["rounds"]):
        order = plan["targets"] if rnd % 2 == 0 else list(reversed(plan["targets"]))
        for t in order:
            for c in plan["connections"]:
                r = wrk(t, c, seconds, lua)
                results.setdefault((t["name"], c), []).append(r)
                print(f"  round {rnd + 1}: {t['name']} at {c} connection(s): {r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, "
                      f"{r['errors']} errors", file=sys.stderr, flush=True)
    return results


def main():
    plan = json.load(sys.stdin)
    workdir = plan["workdir"]
    print("exactness: 60 requests per experiment", file=sys.stderr, flush=True)
    asyncio.run(exactness(plan))
    score(plan, received(plan["mock_log"]))
    print("throughput", file=sys.stderr, flush=True)
    tp = throughput(plan, workdir)

    lines = []
    lines.append(f"### Exactness: two keys of {plan['rpm']} requests per minute (limit {2 * plan['rpm']} a minute), 60 requests each")
    lines.append("")
    lines.append("| gateway | replicas | pattern | answered 200 | refused 429 | other answers | chat calls the provider received | most in any 60 s | overshoot | other calls with the keys |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for e in plan["experiments"]:
        lines.append(f"| {e['gateway']} | {e['replicas']} | {e['pattern']} | {e['granted']} | {e['refused']} | {e['errors']} | "
                     f"{e['reached']} | {e['max_minute']} | {e['overshoot']} | {e['other_calls']} |")
    lines.append("")
    lines.append("Overshoot: for each key, the most chat calls it received in any 60 s beyond its limit, summed over the two keys. "
                 "Other calls: requests made with the experiment's keys that were not chat calls (LiteLLM lists each "
                 "deployment's models with its key when a replica starts); not counted in the overshoot.")
    lines.append("")
    lines.append(f"### Throughput and latency: wrk, {plan['seconds']} s per measurement, {plan['rounds']} alternating rounds (mean)")
    lines.append("")
    lines.append("| target | connections | req/s | p50 ms | p50 overhead ms (1 connection) | errors |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    mock_p50 = {}
    for t in plan["targets"]:
        for c in plan["connections"]:
            rs = tp[(t["name"], c)]
            rps = sum(r["rps"] for r in rs) / len(rs)
            p50 = sum(r["p50"] for r in rs) / len(rs)
            errs = sum(r["errors"] for r in rs)
            if t["name"] == "mock directly":
                mock_p50[c] = p50
            # The difference of medians means something at one connection only (beyond, it is
            # queueing).
            over = f"{p50 - mock_p50[c]:.2f}" if c == 1 and t["name"] != "mock directly" else ""
            lines.append(f"| {t['name']} | {c} | {rps:,.0f} | {p50:.2f} | {over} | {errs} |")
    ours = sum(e["overshoot"] for e in plan["experiments"] if e["gateway"] == "keypool-worker")
    theirs = [str(e["overshoot"]) for e in plan["experiments"] if e["gateway"] == "LiteLLM"]
    lines.append("")
    lines.append(f"keypool-worker overshoot: {ours} (LiteLLM: {', '.join(theirs)})")
    print("\n".join(lines))
    return 1 if ours > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
