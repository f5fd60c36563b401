"""The measurement of bench/vs-peers.sh: requests/s and latency through keypool-worker, Portkey's
open-source gateway and LiteLLM's proxy, and to the mock provider directly, on every route they
all serve (OpenAI chat, OpenAI Responses, Anthropic Messages), with wrk at 1 and 64 connections
in alternating rounds (each round reverses the order of the targets, so that none gains from
running first or last).

Each request names a random user out of 100,000 (in the body, where the route has a place for
it, and in X-Keypool-User); only keypool-worker reads it. Every answer is checked by status:
wrk's non-2xx count and socket errors are reported, and a target with errors on a route has its
numbers marked, since a fast error is not a fast answer.

Before measuring, one request per target and route is sent with urllib and its answer checked
for the route's shape (choices / output / content): a gateway that answers 200 with something
else would otherwise be measured as fast.

Called by bench/vs-peers.sh with a JSON plan on stdin: {workdir, seconds, rounds, connections,
routes: {route: {path, body}}, targets: [{name, url, routes: {route: {model, headers}}}]}.
Prints the tables (Markdown) and the bars' line last; exits 1 when a bar is missed.
"""

import json
import os
import subprocess
import sys
import urllib.request

# wrk's script: the route's body with a random user, the target's headers for the route.
WRK_LUA = r"""
local path = os.getenv("BENCH_PATH")
local template = os.getenv("BENCH_BODY")
local headers = {["Content-Type"] = "application/json"}
for line in string.gmatch(os.getenv("BENCH_HEADERS"), "[^\n]+") do
    local name, value = string.match(line, "^([^:]+): (.*)$")
    headers[name] = value
end
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
request = function()
    local user = "user-" .. math.random(1, 100000)
    headers["X-Keypool-User"] = user
    local body = string.gsub(template, "{user}", user)
    return wrk.format("POST", path, headers, body)
end
"""

# What an answer of each route holds, to tell a real answer from a 200 with something else.
SHAPE = {"chat": "choices", "responses": "output", "messages": "content"}


def body_for(route_plan, model, user="user-1"):
    return route_plan["body"].replace("{model}", model).replace("{user}", user)


def check(target, route, route_plan):
    spec = target["routes"][route]
    req = urllib.request.Request(
        target["url"] + route_plan["path"],
        data=body_for(route_plan, spec["model"]).encode(),
        headers=dict(spec["headers"], **{"Content-Type": "application/json"}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        detail = e.read().decode(errors="replace")[:300] if hasattr(e, "read") else ""
        raise SystemExit(f"{target['name']} does not serve {route}: {e} {detail}")
    if not answer.get(SHAPE[route]):
        raise SystemExit(f"{target['name']} answered {route} without {SHAPE[route]!r}: {json.dumps(answer)[:300]}")


def ms(v):
    if v.endswith("us"):
        return float(v[:-2]) / 1000
    if v.endswith("ms"):
        return float(v[:-2])
    if v.endswith("s"):
        return float(v[:-1]) * 1000
    return float(v)


def wrk(target, route, route_plan, connections, seconds, lua_path, log):
    spec = target["routes"][route]
    env = dict(
        os.environ,
        BENCH_PATH=route_plan["path"],
        BENCH_BODY=route_plan["body"].replace("{model}", spec["model"]),
        BENCH_HEADERS="\n".join(f"{k}: {v}" for k, v in spec["headers"].items()),
    )
    threads = 1 if connections < 2 else 2
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
         "--latency", "-s", lua_path, target["url"]],
        env=env, capture_output=True, text=True, check=False,
    ).stdout
    log.write(f"== {target['name']} {route} {connections}\n{out}\n")
    rps, p50, errors = 0.0, 0.0, 0
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            p50 = ms(parts[1])
        elif line.strip().startswith("Non-2xx"):
            errors += int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            errors += sum(int(p.strip(",")) for p in parts[3::2])
    return {"rps": rps, "p50": p50, "errors": errors}


def main():
    plan = json.load(sys.stdin)
    lua = os.path.join(plan["workdir"], "peers.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    routes = plan["routes"]
    targets = plan["targets"]
    for route, rp in routes.items():
        for t in targets:
            if route in t["routes"]:
                check(t, route, rp)
    results = {}
    with open(os.path.join(plan["workdir"], "wrk.log"), "w") as log:
        for rnd in range(plan["rounds"]):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for route, rp in routes.items():
                for t in order:
                    if route not in t["routes"]:
                        continue
                    for c in plan["connections"]:
                        r = wrk(t, route, rp, c, plan["seconds"], lua, log)
                        results.setdefault((route, t["name"], c), []).append(r)
                        print(f"  round {rnd + 1}: {route}, {t['name']} at {c} connection(s): {r['rps']:.0f} req/s, "
                              f"p50 {r['p50']:.2f} ms, {r['errors']} errors", file=sys.stderr, flush=True)

    def mean(route, name, c, what):
        rs = results[(route, name, c)]
        return sum(r[what] for r in rs) / len(rs)

    lines = [f"wrk, {plan['seconds']} s per measurement, {plan['rounds']} alternating rounds (means); "
             f"random users out of 100,000; the mock provider without added latency", ""]
    direct, ours = targets[0]["name"], targets[1]["name"]
    summary, missed = [], []
    for route, rp in routes.items():
        lines.append(f"#### {route}: `POST {rp['path']}`")
        lines.append("")
        lines.append("| target | upstream call | req/s at 1 | req/s at 64 | p50 ms at 1 | p50 overhead ms at 1 | errors |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        base = mean(route, direct, 1, "p50")
        for t in targets:
            if route not in t["routes"]:
                continue
            n = t["name"]
            errs = sum(r["errors"] for c in plan["connections"] for r in results[(route, n, c)])
            over = "" if n == direct else f"{mean(route, n, 1, 'p50') - base:.2f}"
            lines.append(f"| {n} | {t['routes'][route].get('upstream', '')} | {mean(route, n, 1, 'rps'):,.0f} | "
                         f"{mean(route, n, 64, 'rps'):,.0f} | {mean(route, n, 1, 'p50'):.2f} | {over} | {errs} |")
        lines.append("")
        ours_errors = sum(r["errors"] for c in plan["connections"] for r in results[(route, ours, c)])
        if ours_errors:
            missed.append(f"{route}: {ours_errors} errors through keypool-worker")
        peer = plan["bar_peer"]
        if any(t["name"] == peer and route in t["routes"] for t in targets):
            ratio = mean(route, ours, 64, "rps") / max(mean(route, peer, 64, "rps"), 1e-9)
            ours_over = mean(route, ours, 1, "p50") - base
            peer_over = mean(route, peer, 1, "p50") - base
            summary.append(f"{route} {ratio:.1f}x, overhead {ours_over:.2f} ms vs {peer_over:.2f} ms")
            if ratio < 3.0:
                missed.append(f"{route}: {ratio:.2f}x {peer}'s requests/s at 64 connections (bar: 3x)")
            if ours_over >= peer_over:
                missed.append(f"{route}: p50 overhead {ours_over:.2f} ms, {peer}'s {peer_over:.2f} ms")
    lines.append(f"keypool-worker vs {plan['bar_peer']} (req/s at 64 connections; p50 overhead at 1): " + "; ".join(summary))
    lines.append("PASS" if not missed else "FAIL: " + "; ".join(missed))
    print("\n".join(lines))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
