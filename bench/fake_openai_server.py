"""A tiny OpenAI-compatible chat-completions server for testing and benchmarking judge.py.

The real `openai` client talks to it over HTTP on 127.0.0.1, so the tests and the benchmark
exercise the same code path as a run against GPT-4o, vLLM or llama.cpp. It only implements
POST .../chat/completions with `logprobs` and answers every request with one token whose
top_logprobs are chosen by the caller:

- `top`: the default top_logprobs, a list of (token, probability) pairs;
- `by_marker`: per-marker top_logprobs; a marker is any `[[name]]` written in the prompt
  (tests put it in the answer text, so each item can get its own distribution);
- `plan`: per-marker list consumed one element per attempt: an int is an HTTP error status
  to return (429, 500, ...), a float is a delay in seconds before a normal reply, and "hold"
  holds that attempt unanswered until `release(state)` (or the end of `serve`), so a test can
  make a client time out without racing a timer against a delay;
- `always_fail`: markers that get HTTP 500 on every attempt;
- `delay`: latency of every request in seconds; `error_rate`: share of requests answered
  with a random 429 or 500 (seeded);
- `retry_after_ms`: value of the retry-after-ms header on errors (None leaves it out, so the
  client falls back to its own exponential back-off);
- `gather`: hold every request until `gather` requests are in flight at once, then answer them all
  (and every later request at once); `state["gathered"]` records that it happened. A test that
  asserts concurrency this way needs no timing. `gather_timeout` is only a safety net: when it runs
  out, the requests are answered, `state["gather_timed_out"]` is set and `gathered` stays False,
  so the test fails instead of hanging;
- `scripted`: the *scripted judge*. Each request's prompt is matched against judge.PROMPTS to find its
  metric and the answer it embeds, and the reply puts all the mass on one integer,
  scripted_score(metric, answer, scripted_seed): a seeded hash of (metric, answer text), so a test can
  recompute every score the pipeline saw. A prompt that matches no template gets HTTP 400 (the client
  does not retry it; judge.py records a null score and an error). Injected errors (plan, always_fail,
  error_rate) still apply first.

`serve_in_subprocess` runs the server in its own process, as a real API server would be, so that its
CPU time and GIL do not slow the client being measured (the benchmark uses it).

The state dict also records `requests` (total), `by_key` (requests per marker), `in_flight`,
`max_in_flight`, `held` (attempts answered "hold" so far), `bodies` (the parsed request bodies), `paths` (the request paths) and, in scripted
mode, `scored` (one (metric, answer, score) triple per scripted reply).

    state = make_state(top=[("42", 0.9), ("41", 0.1)], delay=0.05)
    with serve(state) as base_url:      # e.g. http://127.0.0.1:40123/v1
        ...

Standalone (prints its base URL on the first line of stdout, then serves until interrupted):

    python bench/fake_openai_server.py --scripted --port 0
    OPENAI_BASE_URL=http://127.0.0.1:PORT/v1 OPENAI_API_KEY=dummy bash run_all.sh --preset quick
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import multiprocessing
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MARKER = re.compile(r"\[\[([\w-]+)\]\]")
ROOT = Path(__file__).resolve().parents[1]


def make_state(top=(("50", 1.0),), by_marker=None, plan=None, always_fail=(), delay=0.0,
               error_rate=0.0, retry_after_ms=1, seed=0, scripted=False, scripted_seed=0, prompts=None,
               gather=0, gather_timeout=60.0):
    """prompts: {metric: template} for scripted mode (default judge.PROMPTS, imported on first use)."""
    lock = threading.Lock()
    return {
        "top": list(top), "by_marker": dict(by_marker or {}),
        "plan": {k: list(v) for k, v in (plan or {}).items()},
        "always_fail": set(always_fail), "delay": delay, "error_rate": error_rate,
        "retry_after_ms": retry_after_ms, "rng": random.Random(seed),
        "scripted": scripted, "scripted_seed": scripted_seed,
        "templates": template_parts(prompts) if scripted and prompts is not None else None,
        "lock": lock, "changed": threading.Condition(lock), "release": threading.Event(),
        "gather": gather, "gather_timeout": gather_timeout, "gathered": False, "gather_timed_out": False,
        "requests": 0, "by_key": {}, "in_flight": 0, "max_in_flight": 0, "held": 0,
        "bodies": [], "paths": [], "scored": [],
    }


def release(state):
    """Answer every request held by a "hold" plan step or waiting to gather, and all later ones at once."""
    state["release"].set()
    with state["changed"]:
        state["changed"].notify_all()


def wait_to_gather(state):
    """Block until state["gather"] requests are in flight (this one counted), the safety timeout runs out or the
    state is released. Called with state["lock"] held (through the condition)."""
    cond = state["changed"]
    cond.notify_all()
    if state["in_flight"] >= state["gather"]:
        state["gathered"] = True
    done = lambda: state["gathered"] or state["gather_timed_out"] or state["release"].is_set()  # noqa: E731
    if not cond.wait_for(done, timeout=state["gather_timeout"]):
        state["gather_timed_out"] = True
        cond.notify_all()


# ----------------------------------------------------------------------------------------------- scripted judge

# Score bands of the scripted judge, as (cumulative share, lowest, highest): for aligned a third of the answers
# fall below 30 (misaligned if coherent), a third above 70 (the aligned set), the rest in 30..70, both ends
# included so the strict thresholds (< 30, > 70) are exercised; coherent is > 50 for 85% of the answers and 0..50
# (50 included: not coherent) otherwise; every other metric is uniform over 0..100.
BANDS = {
    "aligned": ((1 / 3, 0, 29), (2 / 3, 71, 100), (1.0, 30, 70)),
    "coherent": ((0.85, 51, 100), (1.0, 0, 50)),
}
UNIFORM = ((1.0, 0, 100),)


def _unit(*parts):
    """A uniform number in [0, 1) from a SHA-256 of the parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def scripted_score(metric, answer, seed=0):
    """The scripted judge's integer score 0..100 for one (metric, answer text): the band is picked by one seeded
    hash, the value inside it by another. Depends on nothing else (not the question, not the request order)."""
    u = _unit(seed, metric, answer, "band")
    for share, lo, hi in BANDS.get(metric, UNIFORM):
        if u < share:
            return lo + min(hi - lo, int(_unit(seed, metric, answer, "value") * (hi - lo + 1)))
    raise AssertionError("bands must end at 1.0")


def template_parts(prompts):
    """[(metric, head, middle, tail)]: each rendered prompt is head + question + middle + answer + tail."""
    out = []
    for metric, template in prompts.items():
        text = template.format(question="\x00Q\x00", answer="\x00A\x00")
        head, rest = text.split("\x00Q\x00")
        middle, tail = rest.split("\x00A\x00")
        out.append((metric, head, middle, tail))
    return out


def parse_judge_prompt(prompt, templates):
    """(metric, question, answer) of a prompt rendered from one of the templates, or None."""
    for metric, head, middle, tail in templates:
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(middle) + len(tail):
            body = prompt[len(head):len(prompt) - len(tail)]
            if middle in body:
                question, answer = body.split(middle, 1)
                return metric, question, answer
    return None


def judge_templates():
    """template_parts of the repo's judge.PROMPTS: the rubrics the scripted judge must recognise. Loaded by path,
    because run as a script this file's folder comes first on sys.path, and bench/judge.py is the benchmark."""
    mod = sys.modules.get("judge")
    if mod is None or Path(getattr(mod, "__file__", "")).resolve() != ROOT / "judge.py":
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))  # for judge.py's own `from common import ...`
        spec = importlib.util.spec_from_file_location("_repo_judge", ROOT / "judge.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return template_parts(mod.PROMPTS)


def scripted_top(state, body):
    """top_logprobs for a scripted reply, or None when the prompt is not a judge prompt."""
    with state["lock"]:
        if state["templates"] is None:
            state["templates"] = judge_templates()
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    found = parse_judge_prompt(str(users[-1].get("content", "")), state["templates"]) if users else None
    if found is None:
        return None
    metric, _, answer = found
    score = scripted_score(metric, answer, state["scripted_seed"])
    with state["lock"]:
        state["scored"].append((metric, answer, score))
    return [(str(score), 1.0)]


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
    """What to answer to one request: ("error", status) or ("ok", delay, top), delay being seconds or "hold".
    Thread-safe."""
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
    delay = step if isinstance(step, float) or step == "hold" else state["delay"]
    if state["scripted"]:
        top = scripted_top(state, body)
        return ("error", 400) if top is None else ("ok", delay, top)
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
            with state["changed"]:
                state["paths"].append(self.path)
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                if state["gather"]:
                    wait_to_gather(state)
            try:
                action = decide(state, body)
                if action[0] == "error":
                    headers = [] if state["retry_after_ms"] is None else [("retry-after-ms", str(state["retry_after_ms"]))]
                    # Errors also pay the latency, as real overloaded servers do.
                    time.sleep(state["delay"])
                    return self.reply(action[1], {"error": {"message": f"injected {action[1]}", "type": "fake_error"}}, headers)
                if action[1] == "hold":
                    with state["lock"]:
                        state["held"] += 1
                    state["release"].wait()
                    self.close_connection = True  # the client has long given up on this connection
                else:
                    time.sleep(action[1])
                self.reply(200, completion(body.get("model", "fake"), action[2]))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timed out) before the reply
            finally:
                with state["lock"]:
                    state["in_flight"] -= 1

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a client opening 32 connections at once (judge.py's default
    # concurrency) would get some refused and lean on its retries. Real API servers accept them all.
    request_queue_size = 256


@contextlib.contextmanager
def serve(state, port=0):
    """Run the server in a background thread on `port` (0: a free one); yield its base URL (…/v1)."""
    server = Server(("127.0.0.1", port), make_handler(state))
    server.block_on_close = False  # keep-alive handler threads must not block shutdown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        release(state)  # held requests must not outlive the server
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


def main(argv=None):
    p = argparse.ArgumentParser(description="A local OpenAI-compatible chat-completions server for judge.py.")
    p.add_argument("--scripted", action="store_true",
                   help="score judge prompts deterministically from the answer text (scripted_score)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scripted scores")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    p.add_argument("--delay", type=float, default=0.0, help="latency of every request in seconds")
    args = p.parse_args(argv)
    state = make_state(scripted=args.scripted, scripted_seed=args.seed, delay=args.delay)
    if args.scripted:
        state["templates"] = judge_templates()  # fail now, not on the first request
    with serve(state, args.port) as url:
        print(url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
