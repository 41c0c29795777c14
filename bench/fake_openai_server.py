"""A tiny OpenAI-compatible chat-completions server for testing and benchmarking judge.py.

The real `openai` client talks to it over HTTP on 127.0.0.1, so the tests and the benchmark
exercise the same code path as a run against GPT-4o, vLLM or llama.cpp. It only implements
POST .../chat/completions with `logprobs` and answers every request with one token whose
top_logprobs are chosen by the caller:

- `top`: the default top_logprobs, a list of (token, probability) pairs;
- `by_marker`: per-marker top_logprobs; a marker is any `[[name]]` written in the prompt
  (tests put it in the answer text, so each item can get its own distribution);
- `plan`: per-marker list consumed one element per attempt: an int is an HTTP error status
  to return (429, 500, ...), a float is a delay in seconds before a normal reply;
- `always_fail`: markers that get HTTP 500 on every attempt;
- `delay`: latency of every request in seconds; `error_rate`: share of requests answered
  with a random 429 or 500 (seeded);
- `retry_after_ms`: value of the retry-after-ms header on errors (None leaves it out, so the
  client falls back to its own exponential back-off).

`serve_in_subprocess` runs the server in its own process, as a real API server would be, so that its
CPU time and GIL do not slow the client being measured (the benchmark uses it).

The state dict also records `requests` (total), `by_key` (requests per marker), `in_flight`,
`max_in_flight`, `bodies` (the parsed request bodies) and `paths` (the request paths).

    state = make_state(top=[("42", 0.9), ("41", 0.1)], delay=0.05)
    with serve(state) as base_url:      # e.g. http://127.0.0.1:40123/v1
        ...
"""

import contextlib
import json
import math
import multiprocessing
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = re.compile(r"\[\[([\w-]+)\]\]")


def make_state(top=(("50", 1.0),), by_marker=None, plan=None, always_fail=(), delay=0.0,
               error_rate=0.0, retry_after_ms=1, seed=0):
    return {
        "top": list(top), "by_marker": dict(by_marker or {}),
        "plan": {k: list(v) for k, v in (plan or {}).items()},
        "always_fail": set(always_fail), "delay": delay, "error_rate": error_rate,
        "retry_after_ms": retry_after_ms, "rng": random.Random(seed),
        "lock": threading.Lock(), "requests": 0, "by_key": {}, "in_flight": 0,
        "max_in_flight": 0, "bodies": [], "paths": [],
    }


def completion(model, top):
    """A chat.completion object whose single generated token is the most likely of `top`."""
    entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top]
    first = max(entries, key=lambda e: e["logprob"])
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{
            "index": 0, "finish_reason": "length",
            "message": {"role": "assistant", "content": first["token"]},
            "logprobs": {"content": [dict(first, top_logprobs=entries)]},
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def decide(state, body):
    """What to answer to one request: ("error", status) or ("ok", delay, top). Thread-safe."""
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    found = MARKER.search(prompt)
    key = found.group(1) if found else None
    with state["lock"]:
        state["requests"] += 1
        state["by_key"][key] = state["by_key"].get(key, 0) + 1
        state["bodies"].append(body)
        step = state["plan"][key].pop(0) if state["plan"].get(key) else None
        random_error = state["error_rate"] > 0 and state["rng"].random() < state["error_rate"]
        random_status = state["rng"].choice([429, 500])
    if key in state["always_fail"]:
        return "error", 500
    if isinstance(step, int):
        return "error", step
    if random_error:
        return "error", random_status
    delay = step if isinstance(step, float) else state["delay"]
    return "ok", delay, state["by_marker"].get(key, state["top"])


def make_handler(state):
    # http.server dispatches to a handler class, so the library forces one here.
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real API server
        # Headers and body go out as two writes; with Nagle's algorithm on, the second waits for the
        # client's delayed ACK (~40 ms), which would dwarf the latency being simulated.
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def reply(self, status, obj, headers=()):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self.path.split("?")[0].endswith("/chat/completions"):
                return self.reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            with state["lock"]:
                state["paths"].append(self.path)
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            try:
                action = decide(state, body)
                if action[0] == "error":
                    headers = [] if state["retry_after_ms"] is None else [("retry-after-ms", str(state["retry_after_ms"]))]
                    # Errors also pay the latency, as real overloaded servers do.
                    time.sleep(state["delay"])
                    return self.reply(action[1], {"error": {"message": f"injected {action[1]}", "type": "fake_error"}}, headers)
                time.sleep(action[1])
                self.reply(200, completion(body.get("model", "fake"), action[2]))
            finally:
                with state["lock"]:
                    state["in_flight"] -= 1

    return Handler


@contextlib.contextmanager
def serve(state):
    """Run the server in a background thread on a free port; yield its base URL (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    server.block_on_close = False  # keep-alive handler threads must not block shutdown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


COUNTERS = ("requests", "by_key", "max_in_flight")


def _child(conn, options):
    state = make_state(**options)
    with serve(state) as url:
        conn.send(url)
        while conn.recv() == "stats":
            with state["lock"]:
                conn.send({k: state[k] for k in COUNTERS})


@contextlib.contextmanager
def serve_in_subprocess(**options):
    """Like serve(make_state(**options)) in a child process; yields (base_url, stats) where stats() returns
    the child's counters (requests, by_key, max_in_flight)."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(child, options), daemon=True)
    proc.start()
    try:
        url = parent.recv()

        def stats():
            parent.send("stats")
            return parent.recv()

        yield url, stats
    finally:
        parent.send("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
