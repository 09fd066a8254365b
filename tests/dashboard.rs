//! The live dashboard end to end, in a real headless Chromium driven over WebDriver
//! (chromedriver, spoken to directly with reqwest): after a real run (main Q4_1, candidate
//! Q2_K, the kl-divergence plugin) the page's headline equals `/api/summary`, the charts
//! have the bins `/api/series` computed, a comparison opens with its tokens coloured by KLD
//! from the legend's scale, a token shows both models' top-N, the numbers refresh without a
//! reload, and with `keep_text: false` the page shows no text. Screenshots:
//! `target/dashboard.png` (1280 px) and `target/dashboard-phone.png` (390 px).
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`/usr/bin/chromium`,
//! `/usr/bin/chromedriver`; override with `CHROMIUM` / `CHROMEDRIVER`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, model, LlamaServer};
use kl_proxy::config::Config;
use kl_proxy::Service;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const TOKEN: &str = "dash-s3cret";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn dist(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../plugins/dist/{name}.wasm"));
    assert!(p.exists(), "{} missing: run `make plugins`", p.display());
    p
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn binary(var: &str, default: &str, package: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        p.exists(),
        "{} is missing: install it with `apt-get install -y chromium chromium-driver` \
         (package {package}), or set {var}",
        p.display()
    );
    p
}

/// chromedriver, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = binary("CHROMIUM", "/usr/bin/chromium", "chromium");
        let driver_bin = binary("CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver");
        let port = free_port();
        let child = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match http.get(format!("{}/status", driver.url)).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,1450",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let r: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_owned();
        Browser {
            http,
            session: format!("{}/session/{id}", driver.url),
            _driver: driver,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns what it returns.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Waits until `script` returns something truthy; returns it.
    async fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.js(script, json!([])).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A real (WebDriver) click on the first element matching `css`.
    async fn click(&self, css: &str) {
        let e = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        let id = e[ELEMENT].as_str().expect("element id").to_owned();
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    async fn screenshot(&self, path: &Path) {
        let b64 = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64_decode(b64.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let (mut out, mut acc, mut bits) = (Vec::with_capacity(s.len() * 3 / 4), 0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

async fn start_service(
    main: &LlamaServer,
    cand: &LlamaServer,
    db: &Path,
    admin_extra: &str,
    store_extra: &str,
) -> Service {
    let yaml = format!(
        "target_host: {}\ncandidate_host: {}\nadmin: {{listen: \"127.0.0.1:0\"{admin_extra}}}\n\
         store: {{path: \"{}\"{store_extra}}}\nplugins:\n  - name: kl\n    path: {}\n",
        main.url(),
        cand.url(),
        db.display(),
        dist("kl-divergence").display()
    );
    Service::start(
        Config::from_yaml(&yaml, None).unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap()
}

/// Sends chat requests, reads each answer fully, and returns the answers' texts.
async fn chat(service: &Service, prompts: &[&str]) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for p in prompts {
        let r = http
            .post(format!("http://{}/v1/chat/completions", service.addr))
            .json(&json!({"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0.8, "seed": 5}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let v: Value = r.json().await.unwrap();
        out.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    out
}

/// Waits until `n` comparisons are settled and stored.
async fn settle(service: &Service, admin: &str, token: Option<&str>, n: usize) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut req = http.get(format!("{admin}/api/comparisons?limit=100"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let list: Value = req.send().await.unwrap().json().await.unwrap();
        let stored = list["comparisons"].as_array().map_or(0, Vec::len);
        let stats = service.stats().unwrap();
        if stored >= n && stats.pending() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "comparisons did not settle: {stored} stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(admin: &str, path: &str, token: Option<&str>) -> Value {
    let mut req = reqwest::Client::new().get(format!("{admin}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// A number the page shows (`data-value`), parsed.
fn shown(h: &Value, id: &str) -> f64 {
    h[id]["value"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{id} shows no number: {h}"))
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12) || (a - b).abs() < 1e-12
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_real_run() {
    let main = LlamaServer::start(model("q4_1"));
    let cand = LlamaServer::start(model("q2_k"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kl.db");
    let service = start_service(&main, &cand, &db, &format!(", token: {TOKEN}"), "").await;
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let tok = Some(TOKEN);
    chat(
        &service,
        &[
            "Name a fruit.",
            "What is two plus two?",
            "Say hello in French.",
        ],
    )
    .await;
    settle(&service, &admin, tok, 3).await;

    // The API, without a browser: the page is public (no data), the data is not.
    let http = reqwest::Client::new();
    let page = http.get(format!("{admin}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.headers().contains_key("content-security-policy"));
    let api = http
        .get(format!("{admin}/api/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    for bad in [
        "/api/series?name=a\"b",
        "/api/series?bins=x",
        "/api/series?bins=0",
        "/api/comparisons?series=%22",
    ] {
        let r = http
            .get(format!("{admin}{bad}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let summary = get(&admin, "/api/summary", tok).await;
    let series = get(&admin, "/api/series?name=kl.kld", tok).await;
    let kld_n = summary["kld"]["n"].as_u64().unwrap();
    assert_eq!(series["n"].as_u64(), Some(kld_n), "{series}");
    let bins = series["histogram"]["bins"].as_array().unwrap();
    let below = series["histogram"]["below"].as_u64().unwrap();
    let hist_total: u64 = bins.iter().map(|b| b["n"].as_u64().unwrap()).sum::<u64>() + below;
    assert_eq!(hist_total, kld_n, "every value in one bin");
    assert_eq!(series["scale"], "log");
    for key in ["by_context", "by_time"] {
        let buckets = series[key]["buckets"].as_array().unwrap();
        let total: u64 = buckets.iter().map(|b| b["n"].as_u64().unwrap()).sum();
        assert_eq!(total, kld_n, "{key}");
        let weighted: f64 = buckets.iter().map(|b| f(&b["mean"]) * f(&b["n"])).sum();
        assert!(
            close(weighted / kld_n as f64, f(&summary["kld"]["mean"]), 1e-9),
            "{key}: the buckets' means average to the report's mean"
        );
    }
    let info = get(&admin, "/api/info", tok).await;
    assert_eq!(info["plugins"], json!(["kl"]));
    assert_eq!(info["default_series"], "kl.kld");
    assert_eq!(info["keep_text"], true);

    // The page.
    let browser = Browser::start().await;
    browser.goto(&format!("{admin}/?token={TOKEN}")).await;
    browser
        .wait("the first refresh", "return +document.body.dataset.loaded >= 1 && document.querySelectorAll('#recent tbody tr[data-id]').length;")
        .await;
    let search = browser.js("return location.search;", json!([])).await;
    assert_eq!(search, "", "the token is taken out of the address bar");
    let h = browser
        .js(
            "const o = {}; for (const e of document.querySelectorAll('.card .value')) \
             o[e.id] = {value: e.dataset.value, text: e.textContent}; return o;",
            json!([]),
        )
        .await;
    let failed: u64 = summary["comparisons_failed"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(shown(&h, "h-ok"), f(&summary["comparisons_ok"]));
    assert_eq!(shown(&h, "h-ok"), 3.0);
    assert_eq!(shown(&h, "h-failed"), failed as f64);
    assert_eq!(shown(&h, "h-dropped"), f(&summary["live"]["dropped"]));
    assert_eq!(shown(&h, "h-positions"), f(&summary["aligned_positions"]));
    assert!(close(
        shown(&h, "h-coverage"),
        f(&summary["aligned_positions"]) / f(&summary["positions"]),
        1e-12
    ));
    let expect = [
        ("h-kld-mean", f(&summary["kld"]["mean"])),
        ("h-kld-median", f(&summary["kld"]["median"])),
        ("h-kld-p99", f(&summary["kld"]["p99"])),
        ("h-same-top", f(&summary["same_top"][0])),
        ("h-rms-dp", f(&summary["rms_delta_p"][0])),
        ("h-ppl-ratio", f(&summary["ppl_ratio"])),
    ];
    for (id, want) in expect {
        assert!(want.is_finite(), "{id}: the summary has it: {summary}");
        // Exact up to serde_json's parsing (not correctly rounded without `float_roundtrip`).
        assert!(
            close(shown(&h, id), want, 1e-12),
            "{id}: {} vs {want}",
            shown(&h, id)
        );
        // The text shown is the same number, rounded.
        let text = h[id]["text"].as_str().unwrap();
        let first: String = text
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches('%')
            .to_owned();
        let mut n: f64 = first.parse().unwrap_or_else(|_| panic!("{id}: {text}"));
        if text.starts_with(&format!("{first}%"))
            || first.len() < text.split_whitespace().next().unwrap().len()
        {
            n /= 100.0;
        }
        assert!(close(n, want, 1e-2), "{id}: shows {text}, summary {want}");
        if id == "h-kld-mean" {
            assert!(text.contains('±'), "mean ± error: {text}");
        }
    }

    // The charts have what /api/series computed.
    let charts = browser
        .js(
            "return {hist: document.querySelectorAll('#chart-hist rect.bar').length, \
             ctx: document.querySelectorAll('#chart-ctx rect.bar').length, \
             time: document.querySelectorAll('#chart-time circle.dot').length, \
             plugin: (document.querySelector('#plugins li[data-plugin=\"kl\"] .fails') || {}).textContent, \
             series: document.getElementById('series').value};",
            json!([]),
        )
        .await;
    assert_eq!(
        charts["hist"].as_u64().unwrap(),
        bins.len() as u64 + u64::from(below > 0),
        "{charts}"
    );
    assert_eq!(
        charts["ctx"].as_u64().unwrap() as usize,
        series["by_context"]["buckets"].as_array().unwrap().len()
    );
    assert_eq!(
        charts["time"].as_u64().unwrap() as usize,
        series["by_time"]["buckets"].as_array().unwrap().len()
    );
    assert_eq!(charts["plugin"], "0 failures");
    assert_eq!(charts["series"], "kl.kld");

    // The recent table: the API's list, newest first; open the newest.
    let list = get(&admin, "/api/comparisons?limit=50&series=kl.kld", tok).await;
    let ids: Vec<Value> = list["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    let rows = browser
        .js(
            "return [...document.querySelectorAll('#recent tbody tr')].map(r => r.dataset.id);",
            json!([]),
        )
        .await;
    assert_eq!(rows, Value::from(ids.clone()));
    assert!(list["comparisons"][0]["series"]["mean"].is_number());
    let id = ids[0].as_str().unwrap().to_owned();
    browser.click("#recent tbody tr").await;
    let n_tokens = browser
        .wait(
            "the comparison's tokens",
            "return !document.getElementById('detail').hidden && document.querySelectorAll('#tokens .tok').length;",
        )
        .await;
    let one = get(&admin, &format!("/api/comparisons/{id}"), tok).await;
    let positions = one["record"]["positions"].as_array().unwrap();
    assert_eq!(n_tokens.as_u64().unwrap() as usize, positions.len());
    let texts: std::collections::HashMap<i64, String> = one["record"]["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_i64().unwrap(),
                t["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let toks = browser
        .js(
            "return [...document.querySelectorAll('#tokens .tok')].map(s => ({text: s.textContent, \
             v: s.dataset.v === undefined ? null : +s.dataset.v, token: +s.dataset.token, \
             bg: getComputedStyle(s).backgroundColor, diverge: s.classList.contains('diverge'), \
             na: s.classList.contains('na')}));",
            json!([]),
        )
        .await;
    let legend = browser
        .js(
            "return [...document.querySelectorAll('#legend .sw[data-colour]')].map(s => \
             ({lo: +s.dataset.lo, hi: +s.dataset.hi, bg: getComputedStyle(s).backgroundColor}));",
            json!([]),
        )
        .await;
    let legend = legend.as_array().unwrap();
    assert!(
        legend.len() >= 5,
        "a legend with the colour steps: {legend:?}"
    );
    let mut colours = std::collections::BTreeSet::new();
    let mut diverging = None;
    for (i, (t, p)) in toks.as_array().unwrap().iter().zip(positions).enumerate() {
        let main_id = p["main"]["id"].as_i64().unwrap();
        assert_eq!(t["token"].as_i64(), Some(main_id), "token {i}");
        let want_text = match texts.get(&main_id).map(String::as_str) {
            None | Some("") => "·",
            Some(s) => s,
        };
        assert_eq!(t["text"], want_text, "token {i}'s text");
        let value = one["position_values"][i]["kl.kld"].as_f64();
        match value {
            Some(v) => {
                let shown_v = t["v"].as_f64().unwrap_or(f64::NAN);
                assert!(
                    close(shown_v, v, 1e-12),
                    "token {i}'s value {shown_v} vs {v}"
                );
                // JSON has no infinity: the open ends of the scale come back as null.
                let swatch = legend
                    .iter()
                    .find(|s| {
                        s["lo"].as_f64().is_none_or(|lo| lo <= v)
                            && s["hi"].as_f64().is_none_or(|hi| v < hi)
                    })
                    .expect("a legend step for every value");
                assert_eq!(
                    t["bg"], swatch["bg"],
                    "token {i} ({v}) has its legend colour"
                );
                colours.insert(t["bg"].as_str().unwrap().to_owned());
            }
            None => assert_eq!(t["na"], true, "token {i} has no value"),
        }
        let differs =
            p["status"] == "aligned" && p["candidate_pick"].as_i64().is_some_and(|c| c != main_id);
        assert_eq!(
            t["diverge"], differs,
            "token {i}: marked where the pick differs"
        );
        if differs && diverging.is_none() {
            diverging = Some(i);
        }
    }
    assert!(
        colours.len() >= 2,
        "Q2_K is far from Q4_1: more than one colour ({colours:?})"
    );

    // Select a token (where the candidate's pick differs, when there is one).
    let i = diverging.unwrap_or(0);
    browser
        .click(&format!("#tokens .tok[data-i=\"{i}\"]"))
        .await;
    let pos = browser
        .wait(
            "the position panel",
            &format!(
                "const p = document.getElementById('pos'); if (p.dataset.i !== '{i}') return null; \
                 return {{main: p.querySelectorAll('.main tr[data-token]').length, \
                 cand: p.querySelectorAll('.cand tr[data-token]').length, \
                 pick: (p.querySelector('.cand tr.is-pick') || {{dataset: {{}}}}).dataset.token, \
                 dp: (p.querySelector('dd[data-k=dp]') || {{dataset: {{}}}}).dataset.value, \
                 pickText: p.querySelector('dd[data-k=pick]').textContent, \
                 selected: document.querySelector('#tokens .tok.sel').dataset.i}};"
            ),
        )
        .await;
    let p = &positions[i];
    assert_eq!(pos["selected"], i.to_string());
    assert_eq!(
        pos["main"].as_u64().unwrap() as usize,
        p["main_top"].as_array().unwrap().len()
    );
    assert_eq!(
        pos["cand"].as_u64().unwrap() as usize,
        p["candidate_top"].as_array().unwrap().len()
    );
    if let Some(lc) = p["candidate"].as_f64() {
        let want = lc.exp() - f(&p["main"]["logprob"]).exp();
        let got: f64 = pos["dp"].as_str().unwrap().parse().unwrap();
        assert!((got - want).abs() < 1e-9, "Δp {got} vs {want}");
    }
    if diverging.is_some() {
        assert!(pos["pickText"].as_str().unwrap().contains("differs"));
        let pick = p["candidate_pick"].as_i64().unwrap();
        if p["candidate_top"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"].as_i64() == Some(pick))
        {
            assert_eq!(
                pos["pick"],
                pick.to_string(),
                "the pick is marked in its top-N"
            );
        }
    }

    // Screenshots, as test artefacts.
    browser.js("window.scrollTo(0, 0);", json!([])).await;
    let shot = target_dir().join("dashboard.png");
    browser.screenshot(&shot).await;
    browser.resize(390, 2600).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wide = browser
        .js("return document.documentElement.scrollWidth;", json!([]))
        .await;
    browser
        .screenshot(&target_dir().join("dashboard-phone.png"))
        .await;
    assert!(
        wide.as_u64().unwrap() <= 400,
        "no horizontal scrolling at phone width: {wide}"
    );
    browser.resize(1280, 1450).await;

    // Live: one more comparison shows up without a reload.
    browser.js("window.__same_page = 1;", json!([])).await;
    chat(&service, &["Name a colour."]).await;
    settle(&service, &admin, tok, 4).await;
    browser
        .wait(
            "the live refresh",
            "return window.__same_page === 1 && document.getElementById('h-ok').dataset.value === '4';",
        )
        .await;
    browser.quit().await;
    service.shutdown().await.unwrap();
    eprintln!("screenshots: {} and dashboard-phone.png", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keep_text_off_the_dashboard_shows_no_text() {
    let main = LlamaServer::start(model("q4_1"));
    let cand = LlamaServer::start(model("q2_k"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kl.db");
    let service = start_service(&main, &cand, &db, "", ", keep_text: false").await;
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let answers = chat(&service, &["Say hello in French.", "Name a fruit."]).await;
    settle(&service, &admin, None, 2).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{admin}/")).await;
    browser
        .wait(
            "the first refresh",
            "return document.querySelectorAll('#recent tbody tr[data-id]').length;",
        )
        .await;
    browser.click("#recent tbody tr").await;
    let n = browser
        .wait(
            "the tokens",
            "return document.querySelectorAll('#tokens .tok').length;",
        )
        .await;
    assert!(n.as_u64().unwrap() > 0);
    browser.click("#tokens .tok").await;
    browser
        .wait(
            "the position panel",
            "return document.getElementById('pos').dataset.i;",
        )
        .await;
    let page = browser
        .js(
            "return {text: document.body.innerText, \
             tokenText: [...document.querySelectorAll('#tokens .tok')].map(s => s.textContent).join(''), \
             prompt: document.getElementById('d-prompt').hidden};",
            json!([]),
        )
        .await;
    assert_eq!(page["tokenText"], "", "no token text");
    assert_eq!(page["prompt"], true, "no prompt");
    let text = page["text"].as_str().unwrap();
    for answer in &answers {
        for word in answer.split_whitespace().filter(|w| w.len() >= 5) {
            assert!(!text.contains(word), "{word:?} of an answer is on the page");
        }
    }
    for prompt in ["Say hello in French", "Name a fruit"] {
        assert!(!text.contains(prompt));
    }
    browser.quit().await;
    service.shutdown().await.unwrap();
}
