#!/usr/bin/env python3
"""`make bench`: kl-proxy side by side with the direct path, nginx and LiteLLM, in one run.

Every figure that matters is a ratio or a difference against the direct path measured in the
same run (these machines are shared and noisy). Writes bench/results.json and prints a table.
All traffic goes to 127.0.0.1; every loop is bounded; every process started is stopped on exit.

Environment: KLPROXY_CACHE (default ~/.cache/kl-proxy), BENCH_ROUNDS (default 2),
BENCH_QUICK=1 (shorter runs, for trying the script), BENCH_SKIP=litellm,llama (comma list).
"""
import atexit
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("KLPROXY_CACHE") or os.path.expanduser("~/.cache/kl-proxy")
OUT = os.path.join(ROOT, "bench", "out")
KLP = os.path.join(ROOT, "target", "release", "kl-proxy")
HARNESS = os.path.join(ROOT, "target", "release", "examples", "bench")
OHA = os.environ.get("OHA") or os.path.join(CACHE, "oha", "bin", "oha")
LITELLM = os.path.join(CACHE, "litellm-venv", "bin", "litellm")
QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if QUICK else "2"))
SKIP = set(filter(None, os.environ.get("BENCH_SKIP", "").split(",")))
T0 = time.time()
BUDGET_S = 14 * 60  # the whole run stays under 15 minutes: later sections shrink or skip

PROCS = []


def log(msg):
    print(f"[bench {time.time() - T0:5.0f}s] {msg}", file=sys.stderr, flush=True)


def cleanup():
    for p in reversed(PROCS):
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.time() + 5
    for p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


atexit.register(cleanup)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda *_: sys.exit(130))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name, argv, env=None, cwd=None):
    logf = open(os.path.join(OUT, f"{name}.log"), "w")
    p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    PROCS.append(p)
    with open(os.path.join(OUT, "pids"), "a") as f:
        f.write(f"{p.pid}\n")
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_http(url, proc, seconds, ok=lambda code, body: code < 500):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.status, r.read()):
                    return True
        except urllib.error.HTTPError as e:
            if ok(e.code, b""):
                return True
        except Exception:
            pass
        time.sleep(0.2)
    return False


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(l.strip() for l in f.readlines()[-n:])
    except OSError:
        return ""


# Every path gets the same Authorization header (LiteLLM needs its master key; the others
# forward it or ignore it). Local only; also in host/examples/bench.rs.
MASTER_KEY = "sk-bench-7f3a9c2e51d84b6f0a1e9d3c7b5f2a48"
CHAT_BODY = json.dumps({"model": "bench", "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in a few sentences."}]})


# ------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------

def klproxy_config(name, upstream_port, port, scoring):
    dead = free_port()  # nothing listens there: comparisons fail at once
    path = os.path.join(OUT, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""target_host: http://127.0.0.1:{upstream_port}
candidate_host: http://127.0.0.1:{dead}
port: {port}
n_probs: 10
strip_logprobs: true
sample_rate: {1.0 if scoring else 0}
queue_capacity: 256
candidate_timeout: 2s
store:
  path: {name}.db
admin:
  listen: 127.0.0.1:{free_port()}
""")
    for ext in ("", "-wal", "-shm"):
        if os.path.exists(os.path.join(OUT, f"{name}.db{ext}")):
            os.remove(os.path.join(OUT, f"{name}.db{ext}"))
    return path


def start_klproxy(name, upstream_port, scoring):
    port = free_port()
    cfg = klproxy_config(name, upstream_port, port, scoring)
    p = start(name, [KLP, "--config", cfg], env={"KLPROXY_LOG": "error"})
    if not wait_http(f"http://127.0.0.1:{port}/health", p, 30):
        raise RuntimeError(f"{name} did not start: {tail(os.path.join(OUT, name + '.log'))}")
    return p, port


def start_nginx(upstream_port):
    port = free_port()
    d = os.path.join(OUT, "nginx")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o777)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream llm {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = start("nginx", [nginx, "-p", d, "-c", conf])
    if not wait_http(f"http://127.0.0.1:{port}/health", p, 15):
        raise RuntimeError(f"nginx did not start: {tail(os.path.join(d, 'error.log'))}")
    return p, port


def start_litellm(upstream_port):
    if "litellm" in SKIP:
        raise RuntimeError("BENCH_SKIP=litellm")
    skip_file = os.path.join(CACHE, "litellm-venv", "SKIPPED")
    if os.path.exists(skip_file):
        raise RuntimeError(open(skip_file).read().strip())
    if not os.path.exists(LITELLM):
        raise RuntimeError(f"not installed ({LITELLM} missing)")
    port = free_port()
    cfg = os.path.join(OUT, "litellm.yaml")
    with open(cfg, "w") as f:
        f.write(f"""model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: sk-bench
litellm_settings:
  telemetry: false
general_settings:
  master_key: {MASTER_KEY}
""")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "NO_PROXY": "*", "no_proxy": "*", "HTTP_PROXY": "", "HTTPS_PROXY": ""}
    p = start("litellm", [LITELLM, "--config", cfg, "--host", "127.0.0.1", "--port", str(port),
                          "--num_workers", "1"], env=env)
    if not wait_http(f"http://127.0.0.1:{port}/health/liveliness", p, 120,
                     ok=lambda c, b: c == 200):
        stop(p)
        raise RuntimeError(f"did not start within 120 s: {tail(os.path.join(OUT, 'litellm.log'), 2)}")
    # One real request: a proxy that starts but cannot answer is skipped too.
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=CHAT_BODY.encode(),
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {MASTER_KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            json.loads(r.read())
    except Exception as e:
        stop(p)
        raise RuntimeError(f"started but a chat request failed: {e}")
    return p, port


# ------------------------------------------------------------------------------------------
# Load generation (oha)
# ------------------------------------------------------------------------------------------

def oha(url, *, conc, seconds, rate=None):
    argv = [OHA, "--no-tui", "--output-format", "json", "-z", f"{seconds}s", "-c", str(conc),
            "-m", "POST", "-H", "content-type: application/json",
            "-H", f"authorization: Bearer {MASTER_KEY}", "-d", CHAT_BODY, url]
    if rate:
        argv[1:1] = ["-q", str(rate), "--latency-correction"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"oha failed: {r.stderr.strip()[:300]}")
    j = json.loads(r.stdout)
    s, lp = j["summary"], j.get("latencyPercentiles", {})
    codes = j.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    total = sum(codes.values()) + sum(j.get("errorDistribution", {}).values())
    ms = lambda v: None if v is None else v * 1e3
    return {"rps": ok / s["total"] if s.get("total") else 0.0,
            "p50_ms": ms(lp.get("p50")), "p99_ms": ms(lp.get("p99")),
            "ok": ok, "total": total, "errors": j.get("errorDistribution", {})}


def scenarios():
    d = 2 if QUICK else 4
    return [("c1", dict(conc=1, seconds=d)),
            ("100/s", dict(conc=8, seconds=d, rate=100)),
            ("1000/s", dict(conc=64, seconds=d + 1, rate=1000)),
            ("peak", dict(conc=64, seconds=d + 1))]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def request_path(paths):
    """paths: [(name, url or error string)] -> {scenario: {path: figures}}"""
    runs = {}
    for rnd in range(ROUNDS):
        for sc, kw in scenarios():
            for name, url in paths:
                if not url.startswith("http"):
                    continue
                try:
                    r = oha(url, **kw)
                except Exception as e:
                    r = {"error": str(e)}
                runs.setdefault(sc, {}).setdefault(name, []).append(r)
            log(f"round {rnd + 1}/{ROUNDS} {sc} done")
    res = {}
    for sc, by_path in runs.items():
        res[sc] = {}
        for name, rs in by_path.items():
            good = [r for r in rs if "error" not in r]
            if not good:
                res[sc][name] = {"error": rs[0]["error"]}
                continue
            res[sc][name] = {k: med([r[k] for r in good]) for k in ("rps", "p50_ms", "p99_ms")}
            res[sc][name]["errors"] = sum(r["total"] - r["ok"] for r in good)
        direct = res[sc].get("direct", {})
        for name, f in res[sc].items():
            if "p50_ms" in f and "p50_ms" in direct:
                f["added_p50_ms"] = f["p50_ms"] - direct["p50_ms"]
                f["added_p99_ms"] = f["p99_ms"] - direct["p99_ms"]
    return res


def streaming(paths, upstream_url):
    res = {}
    n, conc = (8, 4) if QUICK else (16, 4)
    for name, url in paths:
        if not url.startswith("http"):
            continue
        r = subprocess.run([HARNESS, "stream", "--url", url, "--n", str(n), "--conc", str(conc)],
                           capture_output=True, text=True, timeout=120)
        try:
            res[name] = json.loads(r.stdout)
        except ValueError:
            res[name] = {"error": (r.stderr or r.stdout).strip()[:300]}
    d = res.get("direct", {})
    for name, f in res.items():
        if "ttfb_p50_ms" in f and "ttfb_p50_ms" in d:
            f["added_ttfb_p50_ms"] = f["ttfb_p50_ms"] - d["ttfb_p50_ms"]
            f["added_ttfb_p99_ms"] = f["ttfb_p99_ms"] - d["ttfb_p99_ms"]
            f["added_gap_p50_ms"] = f["gap_p50_ms"] - d["gap_p50_ms"]
            f["added_gap_p99_ms"] = f["gap_p99_ms"] - d["gap_p99_ms"]
    return res


def memory(procs_ports):
    res = {}
    for name, (proc, port) in procs_ports.items():
        url = f"http://127.0.0.1:{port}/v1/chat/completions?chunks=64&gap_ms=50"
        r = subprocess.run([HARNESS, "hold", "--url", url, "--n", "1000", "--pid", str(proc.pid)],
                           capture_output=True, text=True, timeout=200)
        try:
            res[name] = json.loads(r.stdout)
        except ValueError:
            res[name] = {"error": (r.stderr or r.stdout).strip()[:300]}
        res[name]["rss_after_settle_kb"] = rss_kb(proc.pid)
    return res


# ------------------------------------------------------------------------------------------
# Candidate cost on real llama-servers
# ------------------------------------------------------------------------------------------

def llama(name, model, port):
    srv = os.path.join(CACHE, "bin", "llama-server")
    p = start(name, [srv, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", "4096",
                     "-t", "1", "-np", "1", "--no-webui"])
    if not wait_http(f"http://127.0.0.1:{port}/health", p, 120, ok=lambda c, b: c == 200):
        raise RuntimeError(f"{name} llama-server did not start: {tail(os.path.join(OUT, name + '.log'))}")
    return p


def post_json(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def parse_summary(text):
    out = {}
    m = re.search(r"comparisons\s+(\d+) ok, (\d+) failed, (\d+) dropped", text)
    if m:
        out["ok"], out["failed"], out["dropped"] = map(int, m.groups())
    m = re.search(r"candidate requests\s+([\d.]+|NaN) per response, ([\d.]+|NaN) tokens decoded per main token", text)
    if m:
        out["requests_per_response"], out["decoded_per_main_token"] = map(float, m.groups())
    m = re.search(r"positions\s+(\d+) \((\d+) aligned, coverage ([\d.]+)%\)", text)
    if m:
        out["positions"], out["aligned"] = int(m.group(1)), int(m.group(2))
        out["coverage_pct"] = float(m.group(3))
    m = re.search(r"time\s+([\d.]+) s", text)
    if m:
        out["seconds"] = float(m.group(1))
    return out


def candidate_cost(n_prompts):
    if "llama" in SKIP:
        raise RuntimeError("BENCH_SKIP=llama")
    models = os.path.join(CACHE, "models")
    main_port, cand_port = free_port(), free_port()
    main = llama("llama-main", os.path.join(models, "smollm2-135m-q4_1.gguf"), main_port)
    cand = llama("llama-cand", os.path.join(models, "smollm2-135m-q8_0.gguf"), cand_port)
    res = {"prompts": n_prompts, "main": "q4_1", "candidate": "q8_0"}
    try:
        prompts = [l for l in open(os.path.join(ROOT, "prompts", "chat.jsonl")) if l.strip()][:n_prompts]
        subset = os.path.join(OUT, "prompts-subset.jsonl")
        with open(subset, "w") as f:
            f.writelines(prompts)
        for strategy in ("forced", "chunked"):
            cfg = os.path.join(OUT, f"eval-{strategy}.yaml")
            with open(cfg, "w") as f:
                f.write(f"target_host: http://127.0.0.1:{main_port}\n"
                        f"candidate_host: http://127.0.0.1:{cand_port}\n"
                        f"n_probs: 10\nstrategy: {strategy}\nport: {free_port()}\n"
                        f"store:\n  path: ''\nadmin:\n  listen: 127.0.0.1:{free_port()}\n")
            r = subprocess.run([KLP, "eval", "--config", cfg, "--prompts", subset],
                               capture_output=True, text=True, timeout=600,
                               env={**os.environ, "KLPROXY_LOG": "warn"})
            with open(os.path.join(OUT, f"eval-{strategy}.txt"), "w") as f:
                f.write(r.stdout + "\n--- stderr\n" + r.stderr)
            res[strategy] = parse_summary(r.stdout) if r.returncode == 0 else {
                "error": r.stderr.strip()[-300:]}
            log(f"eval {strategy}: {res[strategy]}")
        # The main server's decode speed with and without n_probs, alternated, same prompts.
        speeds = {"without": [], "with": []}
        for i, line in enumerate(prompts):
            body = json.loads(line)
            body.update({"temperature": 0, "max_tokens": 64, "seed": 1})
            for key in (("without", "with") if i % 2 == 0 else ("with", "without")):
                b = dict(body)
                if key == "with":
                    b["n_probs"] = 10
                j = post_json(f"http://127.0.0.1:{main_port}/v1/chat/completions", b)
                t = j.get("timings", {})
                if t.get("predicted_per_second"):
                    speeds[key].append(t["predicted_per_second"])
        res["main_tokens_per_s_without_n_probs"] = med(speeds["without"])
        res["main_tokens_per_s_with_n_probs"] = med(speeds["with"])
        if speeds["without"] and speeds["with"]:
            res["n_probs_speed_ratio"] = res["main_tokens_per_s_with_n_probs"] / res["main_tokens_per_s_without_n_probs"]
    finally:
        stop(main)
        stop(cand)
    return res


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def report(R):
    lines = []
    P = lines.append
    P(f"kl-proxy bench  ({R['when']}, {R['cpus']} cores shared, rounds={R['rounds']}, "
      f"load generator: {R['load_generator']}; figures in ms; 'added' = path minus direct, same run)")
    P("")
    P("1. Request path: POST /v1/chat/completions, 64-token answer from a stand-in upstream")
    P(f"   {'path':<18}{'load':<8}{'req/s':>8}{'p50':>8}{'p99':>8}{'+p50':>8}{'+p99':>8}  errors")
    for sc, _ in scenarios():
        for name in R["paths"]:
            fig = R["request_path"].get(sc, {}).get(name)
            skipped = R["skipped"].get(name)
            if skipped:
                if sc == "c1":
                    P(f"   {name:<18}{'all':<8}skipped: {skipped}")
                continue
            if fig is None:
                continue
            if "error" in fig:
                P(f"   {name:<18}{sc:<8}error: {fig['error'][:80]}")
                continue
            P(f"   {name:<18}{sc:<8}{f(fig['rps'], '{:.0f}'):>8}{f(fig['p50_ms']):>8}{f(fig['p99_ms']):>8}"
              f"{f(fig.get('added_p50_ms')):>8}{f(fig.get('added_p99_ms')):>8}  {fig['errors']}")
    P("")
    P("2. Streaming: 64 SSE chunks 20 ms apart")
    P(f"   {'path':<18}{'ttfb p50':>9}{'+ttfb p50':>10}{'+ttfb p99':>10}{'gap p50':>9}{'gap p99':>9}{'+gap p99':>9}  frames/events")
    for name in R["paths"]:
        s = R["streaming"].get(name)
        if R["skipped"].get(name):
            P(f"   {name:<18}skipped: {R['skipped'][name]}")
            continue
        if not s or "error" in s:
            P(f"   {name:<18}error: {(s or {}).get('error', 'not run')[:80]}")
            continue
        P(f"   {name:<18}{f(s['ttfb_p50_ms']):>9}{f(s.get('added_ttfb_p50_ms')):>10}{f(s.get('added_ttfb_p99_ms')):>10}"
          f"{f(s['gap_p50_ms']):>9}{f(s['gap_p99_ms']):>9}{f(s.get('added_gap_p99_ms')):>9}  {s['frames']}/{s['events']}")
    P("")
    P("3. Memory (kl-proxy RSS, MB)")
    for name, m in R["memory"].items():
        if "error" in m:
            P(f"   {name:<18}error: {m['error'][:80]}")
            continue
        mb = lambda kb: None if kb is None else kb / 1024
        P(f"   {name:<18}idle {f(mb(m.get('rss_start_kb')), '{:.1f}')}, before streams {f(mb(m['rss_idle_kb']), '{:.1f}')}, "
          f"{m['open']}/{m['streams']} streams open {f(mb(m['rss_open_kb']), '{:.1f}')}, after {f(mb(m.get('rss_after_settle_kb')), '{:.1f}')}")
    P("")
    P("4. Candidate cost on real llama-servers (main SmolLM2-135M Q4_1, candidate Q8_0)")
    c = R["candidate"]
    if "error" in c:
        P(f"   skipped: {c['error'][:120]}")
    else:
        for s in ("forced", "chunked"):
            e = c.get(s, {})
            if "error" in e:
                P(f"   {s:<8} error: {e['error'][:100]}")
            else:
                P(f"   {s:<8} {f(e.get('requests_per_response'))} candidate requests per response, "
                  f"{f(e.get('decoded_per_main_token'))} decoded candidate tokens per main token "
                  f"({e.get('ok', '-')} ok / {e.get('failed', '-')} failed, {e.get('positions', '-')} positions, {f(e.get('seconds'), '{:.1f}')} s)")
        P(f"   main server decode: {f(c.get('main_tokens_per_s_without_n_probs'), '{:.1f}')} tok/s without n_probs, "
          f"{f(c.get('main_tokens_per_s_with_n_probs'), '{:.1f}')} with n_probs=10 (ratio {f(c.get('n_probs_speed_ratio'), '{:.3f}')})")
    P("")
    P("5. Plugin path: kl-divergence, 256-position records, top-10 lists")
    pl = R["plugin"]
    if "error" in pl:
        P(f"   error: {pl['error'][:120]}")
    else:
        P(f"   Wasm {pl['wasm_positions_per_s'] / 1e6:.2f} M positions/s, native {pl['native_positions_per_s'] / 1e6:.2f} M positions/s "
          f"(ratio {pl['ratio']:.2f}); per record {pl['wasm_us_per_record']:.1f} us vs {pl['native_us_per_record']:.1f} us; "
          f"per-call overhead {pl['call_overhead_us']:.1f} us (1-position record)")
    P("")
    P("Goals")
    for g in R["goals"]:
        P(f"   [{g['status']:<6}] {g['goal']}: {g['figure']}" + (f"  -- {g['note']}" if g.get("note") else ""))
    return "\n".join(lines)


def goals(R):
    G = []

    def add(goal, ok, figure, note=""):
        G.append({"goal": goal, "status": "n/a" if ok is None else ("MET" if ok else "MISSED"),
                  "figure": figure, "note": note})

    rp = R["request_path"]
    k1000 = rp.get("1000/s", {})
    ng = k1000.get("nginx", {})
    for mode in ("kl-proxy", "kl-proxy scoring"):
        k = k1000.get(mode, {})
        a, b = k.get("added_p99_ms"), ng.get("added_p99_ms")
        if a is None:
            add(f"{mode}: added p99 at 1000 req/s <= nginx's and < 1 ms", None, "not measured")
            continue
        ok = a < 1.0 and (b is None or a <= b)
        note = ""
        if not ok:
            over = [f"{a - 1.0:.2f} ms over 1 ms" if a >= 1.0 else "",
                    f"{a - b:.2f} ms over nginx" if b is not None and a > b else ""]
            note = "missed by " + ", ".join(x for x in over if x)
        add(f"{mode}: added p99 at 1000 req/s <= nginx's and < 1 ms", ok,
            f"{a:.2f} ms (nginx {f(b)} ms, LiteLLM {f(k1000.get('litellm', {}).get('added_p99_ms'))} ms)", note)
    pk = rp.get("peak", {})
    for mode in ("kl-proxy", "kl-proxy scoring"):
        a, b = pk.get(mode, {}).get("rps"), pk.get("nginx", {}).get("rps")
        if not a or not b:
            add(f"{mode}: peak throughput >= 0.8 x nginx", None, "not measured")
            continue
        add(f"{mode}: peak throughput >= 0.8 x nginx", a / b >= 0.8,
            f"{a / b:.2f} x ({a:.0f} vs {b:.0f} req/s; direct {f(pk.get('direct', {}).get('rps'), '{:.0f}')}, "
            f"LiteLLM {f(pk.get('litellm', {}).get('rps'), '{:.0f}')})",
            "" if a / b >= 0.8 else f"missed by {0.8 - a / b:.2f}")
    st = R["streaming"]
    for mode in ("kl-proxy", "kl-proxy scoring"):
        s = st.get(mode, {})
        if "added_ttfb_p50_ms" not in s:
            add(f"{mode}: streaming added TTFB p50 < 1 ms, added gap p99 < 1 ms", None, "not measured")
            continue
        a, g = s["added_ttfb_p50_ms"], s["added_gap_p99_ms"]
        ok = a < 1.0 and g < 1.0
        add(f"{mode}: streaming added TTFB p50 < 1 ms, added gap p99 < 1 ms", ok,
            f"+{a:.2f} ms TTFB, +{g:.2f} ms gap p99 (nginx +{f(st.get('nginx', {}).get('added_ttfb_p50_ms'))} / "
            f"+{f(st.get('nginx', {}).get('added_gap_p99_ms'))}, LiteLLM +{f(st.get('litellm', {}).get('added_ttfb_p50_ms'))} / "
            f"+{f(st.get('litellm', {}).get('added_gap_p99_ms'))})",
            "" if ok else "missed by " + ", ".join(x for x in [
                f"TTFB {a - 1:.2f} ms" if a >= 1 else "", f"gap {g - 1:.2f} ms" if g >= 1 else ""] if x))
    for name, m in R["memory"].items():
        kb = m.get("rss_open_kb")
        if not kb or m.get("open", 0) < m.get("streams", 1):
            add(f"{name}: RSS < 64 MB with 1000 open streams", None,
                f"only {m.get('open', 0)} streams opened" if kb else m.get("error", "not measured"))
            continue
        mb = kb / 1024
        add(f"{name}: RSS < 64 MB with 1000 open streams", mb < 64, f"{mb:.1f} MB",
            "" if mb < 64 else f"missed by {mb - 64:.1f} MB")
    fc = R["candidate"].get("forced", {}).get("decoded_per_main_token")
    ch = R["candidate"].get("chunked", {}).get("decoded_per_main_token")
    add("forced scoring <= 1.05 decoded candidate tokens per main token", None if fc is None else fc <= 1.05,
        f"{f(fc, '{:.3f}')} (chunked {f(ch, '{:.3f}')})",
        "" if fc is None or fc <= 1.05 else f"missed by {fc - 1.05:.3f}")
    r = R["plugin"].get("ratio")
    add("Wasm KL plugin >= 0.5 x native throughput", None if r is None else r >= 0.5,
        f"{f(r)} x", "" if r is None or r >= 0.5 else f"missed by {0.5 - r:.2f}")
    return G


def main():
    os.makedirs(OUT, exist_ok=True)
    open(os.path.join(OUT, "pids"), "w").close()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for b in (KLP, HARNESS, OHA):
        if not os.path.exists(b):
            sys.exit(f"bench: {b} is missing (run `make bench`, which builds and installs it)")
    R = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "rounds": ROUNDS,
         "load_generator": subprocess.run([OHA, "--version"], capture_output=True, text=True).stdout.strip(),
         "paths": ["direct", "kl-proxy", "kl-proxy scoring", "nginx", "litellm"], "skipped": {}}

    up_port = free_port()
    upstream = start("upstream", [HARNESS, "upstream", "--port", str(up_port), "--threads", "1"])
    if not wait_http(f"http://127.0.0.1:{up_port}/health", upstream, 15):
        sys.exit("bench: the stand-in upstream did not start")
    ports = {"direct": up_port}
    procs = {}
    procs["kl-proxy"], ports["kl-proxy"] = start_klproxy("kl-proxy", up_port, scoring=False)
    procs["kl-proxy scoring"], ports["kl-proxy scoring"] = start_klproxy("kl-proxy-scoring", up_port, scoring=True)
    time.sleep(0.5)
    rss_start = {n: rss_kb(procs[n].pid) for n in ("kl-proxy", "kl-proxy scoring")}
    try:
        procs["nginx"], ports["nginx"] = start_nginx(up_port)
    except Exception as e:
        R["skipped"]["nginx"] = str(e)
    log("starting LiteLLM (may take a while)")
    try:
        procs["litellm"], ports["litellm"] = start_litellm(up_port)
    except Exception as e:
        R["skipped"]["litellm"] = str(e)
        log(f"LiteLLM skipped: {e}")
    url = {n: f"http://127.0.0.1:{p}/v1/chat/completions" for n, p in ports.items()}
    paths = [(n, url.get(n, "skipped")) for n in R["paths"]]

    log("1. request path")
    R["request_path"] = request_path(paths)
    log("2. streaming")
    R["streaming"] = streaming(paths, url["direct"])
    # LiteLLM and nginx are not needed any more: free the cores for the rest.
    for n in ("litellm", "nginx"):
        if n in procs:
            stop(procs[n])
    log("3. memory")
    R["memory"] = memory({n: (procs[n], ports[n]) for n in ("kl-proxy", "kl-proxy scoring")})
    for n in R["memory"]:
        R["memory"][n]["rss_start_kb"] = rss_start[n]
    for n in ("kl-proxy", "kl-proxy scoring"):
        stop(procs[n])
    stop(upstream)

    log("5. plugin path")
    try:
        r = subprocess.run([HARNESS, "plugin", "--wasm", os.path.join(ROOT, "plugins", "dist", "kl-divergence.wasm"),
                            "--positions", "256", "--seconds", "2" if QUICK else "4"],
                           capture_output=True, text=True, timeout=300)
        R["plugin"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:]}
    except Exception as e:
        R["plugin"] = {"error": str(e)}

    left = BUDGET_S - (time.time() - T0)
    n_prompts = 4 if QUICK else (8 if left > 360 else 4)
    log(f"4. candidate cost ({n_prompts} prompts, {left:.0f} s left in the budget)")
    try:
        if left < 150:
            raise RuntimeError(f"not enough of the 15-minute budget left ({left:.0f} s)")
        R["candidate"] = candidate_cost(n_prompts)
    except Exception as e:
        R["candidate"] = {"error": str(e)}

    R["goals"] = goals(R)
    R["seconds"] = time.time() - T0
    table = report(R)
    R["table"] = table
    with open(os.path.join(ROOT, "bench", "results.json"), "w") as fh:
        json.dump(R, fh, indent=2, default=str)
    print(table)
    print(f"\n(bench/results.json written; {R['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
