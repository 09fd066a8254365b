//! The wasmtime host of the comparator plugins: it loads WebAssembly components that implement
//! the `kl-proxy:comparator@0.1.0` world (`wit/comparator.wit`), hands each
//! [`AlignedRecord`] to them and collects the [`Metric`]s they return.
//!
//! What it owns:
//! - one [`PluginHost`]: the wasmtime [`Engine`] (epoch interruption on, a ticker thread that
//!   advances the epoch every [`EPOCH_TICK`]) and the optional on-disk compile cache;
//! - per plugin a [`LoadedPlugin`]: the component compiled once ([`wit::ComparatorPre`]) and one
//!   live instance (a `Store` behind a mutex) reused from call to call while it is healthy. After
//!   a trap, a timeout or running out of memory the instance is dropped, and the next call gets a
//!   fresh one (configured again);
//! - the sandbox: WASI preview 2 with no preopened directory, no network, no environment, no
//!   arguments, no inherited stdio. What a plugin writes to stdout/stderr, and what it passes to
//!   the host `log` import, goes to `tracing` (target `kl_proxy::plugin`) under its name, with
//!   control characters escaped so a plugin cannot forge log lines;
//! - the limits: each call is bounded in time by an epoch deadline (`plugin_timeout`) and each
//!   instance's memory by a [`ResourceLimiter`] (`plugin_memory_limit`);
//! - the conversion of an [`AlignedRecord`] into the WIT `comparison`, done once per record for
//!   all plugins, numbers only per position (token texts once per record).
//!
//! Calls are synchronous: the queue worker calls [`PluginSet::compare`] from a blocking thread.
//! A [`PluginSet`] is `Send + Sync`; concurrent calls to the same plugin wait for its instance.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::config::PluginSpec;
use crate::record::{AlignedRecord, PositionStatus};

/// Bindings generated from the same WIT the plugins are built against.
mod wit {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "comparator",
    });
}

use wit::kl_proxy::comparator::host::Level;
use wit::kl_proxy::comparator::types as wt;

/// The WIT package and world this host implements.
pub const WORLD: &str = "kl-proxy:comparator/comparator@0.1.0";
/// The WIT package (and version) whose interfaces a comparator imports.
const PACKAGE: &str = "kl-proxy:comparator";
const PACKAGE_VERSION: &str = "0.1.0";

/// How often the ticker advances the engine's epoch: the granularity of the call timeout.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// `tracing` target of everything a plugin logs or prints.
const LOG_TARGET: &str = "kl_proxy::plugin";
/// Longest log line forwarded (longer ones are cut, saying how much was cut).
const MAX_LOG_LINE: usize = 8 * 1024;
/// Bytes of stdout, stderr and `log` messages forwarded per call (the rest is dropped, counted).
const LOG_BUDGET_PER_CALL: usize = 4 << 20;
/// Instantiation and `configure` get at least this long, whatever `plugin_timeout` says:
/// they run once per instance and an interpreter (Python) takes a while to start.
const MIN_SETUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Table elements an instance may have (8 bytes each).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Limits applied to every plugin the host loads.
#[derive(Debug, Clone)]
pub struct PluginLimits {
    /// Bound on each `compare` call (wall time, to [`EPOCH_TICK`] granularity).
    pub timeout: Duration,
    /// Bound on each instance's linear memory, all memories together, in bytes.
    pub memory_limit: u64,
    /// Where compiled components are cached between runs (none: compile at every load).
    pub cache_dir: Option<PathBuf>,
}

impl PluginLimits {
    /// The limits the config asks for.
    pub fn from_config(config: &crate::config::Config) -> PluginLimits {
        PluginLimits {
            timeout: config.plugin_timeout,
            memory_limit: config.plugin_memory_limit,
            cache_dir: config.plugin_cache_dir.clone(),
        }
    }
}

/// A plugin that cannot be loaded or checked; every message names the plugin and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{plugin}`: file {} not found", path.display())]
    Missing { plugin: String, path: PathBuf },
    #[error("plugin `{plugin}`: cannot read {}: {source}", path.display())]
    Read {
        plugin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin `{plugin}`: {} is not a WebAssembly component: {reason}", path.display())]
    NotComponent {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin `{plugin}`: {} does not implement the {WORLD} world: {reason}", path.display())]
    WrongWorld {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin `{plugin}`: cannot instantiate {}: {reason}", path.display())]
    Instantiate {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin `{plugin}`: configure refused the options: {message}")]
    Configure { plugin: String, message: String },
}

/// Why a plugin call produced no metrics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginFailure {
    /// The plugin trapped (a panic, `unreachable`, a bad memory access, ...); the instance is
    /// replaced before the next call.
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past `plugin_timeout`; the instance is replaced before the next call.
    #[error("timed out")]
    Timeout,
    /// The instance hit `plugin_memory_limit`; it is replaced before the next call.
    #[error("ran out of memory")]
    OutOfMemory,
    /// The plugin returned an error (or metrics the host refuses); the instance is kept.
    #[error("returned an error: {0}")]
    Returned(String),
}

impl PluginFailure {
    /// A short stable label, for metrics and stored results.
    pub fn reason(&self) -> &'static str {
        match self {
            PluginFailure::Trap(_) => "trap",
            PluginFailure::Timeout => "timeout",
            PluginFailure::OutOfMemory => "out_of_memory",
            PluginFailure::Returned(_) => "error",
        }
    }
}

/// One metric a plugin returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    /// `[a-z0-9_]+`, checked by the host.
    pub name: String,
    /// What it measures, one line.
    pub help: String,
    pub value: MetricValue,
}

/// A metric's value; serialised as a number or an array (NaN as `null`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MetricValue {
    /// One number for the whole record.
    Scalar(f64),
    /// One number per position of the record (NaN where not defined).
    PerPosition(Vec<f64>),
}

/// What one plugin made of one record.
#[derive(Debug, Clone)]
pub struct PluginOutcome {
    /// The plugin's name from the config.
    pub plugin: String,
    /// Time the call took (including a re-instantiation after an earlier failure).
    pub elapsed: Duration,
    pub result: Result<Vec<Metric>, PluginFailure>,
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped (when the host and every
/// plugin loaded from it are gone).
struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> std::io::Result<Ticker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The wasmtime engine and what every plugin shares: compile once, instantiate often.
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<PluginState>>,
    limits: PluginLimits,
    ticker: Arc<Ticker>,
}

impl PluginHost {
    /// An engine with epoch interruption, the compile cache when `limits.cache_dir` is set, and
    /// the ticker thread.
    pub fn new(limits: PluginLimits) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        if let Some(dir) = &limits.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!("cannot create plugin cache dir {}: {e}", dir.display())
            })?;
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            let cache = wasmtime::Cache::new(cache)
                .map_err(|e| anyhow::anyhow!("plugin cache dir {}: {e:#}", dir.display()))?;
            config.cache(Some(cache));
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("wasmtime: {e:#}"))?;
        let linker = new_linker(&engine).map_err(|e| anyhow::anyhow!("wasmtime linker: {e:#}"))?;
        let ticker = Ticker::start(engine.clone())
            .map_err(|e| anyhow::anyhow!("cannot start the plugin epoch thread: {e}"))?;
        Ok(PluginHost {
            engine,
            linker: Arc::new(linker),
            limits,
            ticker: Arc::new(ticker),
        })
    }

    /// The limits every plugin gets.
    pub fn limits(&self) -> &PluginLimits {
        &self.limits
    }

    /// Compiles `spec.path` (or takes it from the cache), checks it implements the world,
    /// instantiates it and calls `configure` with `spec.options`.
    pub fn load(&self, spec: &PluginSpec) -> Result<LoadedPlugin, PluginError> {
        let component = compile(&self.engine, &spec.name, &spec.path)?;
        let pre = prepare(&self.linker, &component, &spec.name, &spec.path)?;
        let options = serde_json::to_string(&spec.options).unwrap_or_else(|_| "null".into());
        let plugin = LoadedPlugin {
            name: spec.name.clone(),
            path: spec.path.clone(),
            options,
            pre,
            engine: self.engine.clone(),
            timeout: self.limits.timeout,
            memory_limit: self.limits.memory_limit,
            live: Mutex::new(None),
            _ticker: self.ticker.clone(),
        };
        let live = plugin.instantiate().map_err(|e| match e {
            SetupError::Configure(message) => PluginError::Configure {
                plugin: spec.name.clone(),
                message,
            },
            SetupError::Instantiate(reason) => PluginError::Instantiate {
                plugin: spec.name.clone(),
                path: spec.path.clone(),
                reason,
            },
        })?;
        *plugin.lock() = Some(live);
        Ok(plugin)
    }
}

/// A linker with WASI preview 2 (sync) and the `host` import.
fn new_linker(engine: &Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::<PluginState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    wit::Comparator::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(
        &mut linker,
        |s| s,
    )?;
    Ok(linker)
}

/// Reads and compiles a component, telling a missing file, a non-Wasm file and a core module
/// apart.
fn compile(engine: &Engine, plugin: &str, path: &Path) -> Result<Component, PluginError> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            PluginError::Missing {
                plugin: plugin.into(),
                path: path.into(),
            }
        } else {
            PluginError::Read {
                plugin: plugin.into(),
                path: path.into(),
                source,
            }
        }
    })?;
    let not_component = |reason: String| PluginError::NotComponent {
        plugin: plugin.into(),
        path: path.into(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(not_component(
            "it is not a WebAssembly file (no `\\0asm` header)".into(),
        ));
    }
    // Bytes 4..8: version 1 and layer 0 for a core module, layer 1 for a component.
    if bytes[6..8] == [0, 0] {
        return Err(not_component(
            "it is a core WebAssembly module; build it as a component (e.g. \
             `cargo build --target wasm32-wasip2`, or `wasm-tools component new`)"
                .into(),
        ));
    }
    Component::new(engine, &bytes).map_err(|e| not_component(format!("{e:#}")))
}

/// Checks the component's imports and exports against the world and pre-instantiates it.
fn prepare(
    linker: &Linker<PluginState>,
    component: &Component,
    plugin: &str,
    path: &Path,
) -> Result<wit::ComparatorPre<PluginState>, PluginError> {
    let wrong = |reason: String| PluginError::WrongWorld {
        plugin: plugin.into(),
        path: path.into(),
        reason,
    };
    let pre = linker.instantiate_pre(component).map_err(|e| {
        let mut reason = format!("{e:#}");
        if let Some(v) = other_version(component, linker) {
            reason = format!("it was built against {PACKAGE}@{v}, this host implements @{PACKAGE_VERSION} ({reason})");
        }
        wrong(reason)
    })?;
    wit::ComparatorPre::new(pre).map_err(|e| {
        let exports: Vec<String> = component
            .component_type()
            .exports(linker_engine(linker))
            .map(|(name, _)| name.to_string())
            .collect();
        wrong(format!(
            "{e:#} (it exports: {})",
            if exports.is_empty() {
                "nothing".into()
            } else {
                exports.join(", ")
            }
        ))
    })
}

fn linker_engine(linker: &Linker<PluginState>) -> &Engine {
    linker.engine()
}

/// The version of our package the component imports, when it is not ours.
fn other_version(component: &Component, linker: &Linker<PluginState>) -> Option<String> {
    component
        .component_type()
        .imports(linker_engine(linker))
        .find_map(|(name, _)| {
            let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
            let (_, version) = rest.split_once('@')?;
            (version != PACKAGE_VERSION).then(|| version.to_string())
        })
}

/// For `kl-proxy plugin check FILE.wasm`: whether the file is a comparator this host can load,
/// and which world it implements (or why not).
pub fn check(path: &Path) -> Result<String, PluginError> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let engine = Engine::default();
    let linker = new_linker(&engine).map_err(|e| PluginError::Instantiate {
        plugin: name.clone(),
        path: path.into(),
        reason: format!("wasmtime linker: {e:#}"),
    })?;
    let component = compile(&engine, &name, path)?;
    prepare(&linker, &component, &name, path)?;
    let ty = component.component_type();
    let ours: Vec<String> = ty
        .imports(&engine)
        .filter(|(n, _)| n.starts_with(PACKAGE))
        .map(|(n, _)| n.to_string())
        .collect();
    let wasi = ty
        .imports(&engine)
        .filter(|(n, _)| n.starts_with("wasi:"))
        .count();
    let exports: Vec<String> = ty.exports(&engine).map(|(n, _)| n.to_string()).collect();
    Ok(format!(
        "{}: implements {WORLD} (exports {}; imports {}{wasi} WASI interface(s))",
        path.display(),
        exports.join(", "),
        if ours.is_empty() {
            String::new()
        } else {
            format!("{}, ", ours.join(", "))
        },
    ))
}

/// Why an instance could not be made ready.
enum SetupError {
    Instantiate(String),
    Configure(String),
}

/// A live instance: its store and the handle to its exports.
struct Live {
    store: Store<PluginState>,
    bindings: wit::Comparator,
}

/// One plugin: compiled once, with at most one live instance.
pub struct LoadedPlugin {
    name: String,
    path: PathBuf,
    /// `options` from the config as JSON, handed to every new instance's `configure`.
    options: String,
    pre: wit::ComparatorPre<PluginState>,
    engine: Engine,
    timeout: Duration,
    memory_limit: u64,
    /// The instance reused across calls; `None` after a failure until the next call.
    live: Mutex<Option<Live>>,
    /// Keeps the epoch advancing while this plugin exists.
    _ticker: Arc<Ticker>,
}

impl LoadedPlugin {
    /// The name from the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The component's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands one record to the plugin (converting it; [`PluginSet::compare`] converts once for
    /// all plugins).
    pub fn compare(&self, record: &AlignedRecord) -> PluginOutcome {
        self.call(&to_wit(record), record.positions.len())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        // A panic while the lock was held leaves an instance in an unknown state: drop it.
        self.live.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            *guard = None;
            guard
        })
    }

    /// A fresh store and instance, configured.
    fn instantiate(&self) -> Result<Live, SetupError> {
        let state = PluginState::new(self.name.clone(), self.memory_limit);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.timeout.max(MIN_SETUP_TIMEOUT)));
        let result = self.pre.instantiate(&mut store);
        store.data_mut().flush_output();
        let bindings = result
            .map_err(|e| SetupError::Instantiate(describe_error(&e, store.data(), self.timeout)))?;
        let configured = bindings.call_configure(&mut store, &self.options);
        store.data_mut().flush_output();
        match configured {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(SetupError::Configure(escape(&message))),
            Err(e) => Err(SetupError::Configure(describe_error(
                &e,
                store.data(),
                self.timeout.max(MIN_SETUP_TIMEOUT),
            ))),
        }
    }

    /// Calls `compare` on the live instance (making one first if the last call failed).
    fn call(&self, comparison: &wt::Comparison, positions: usize) -> PluginOutcome {
        let start = Instant::now();
        let result = self.call_inner(comparison, positions);
        PluginOutcome {
            plugin: self.name.clone(),
            elapsed: start.elapsed(),
            result,
        }
    }

    fn call_inner(
        &self,
        comparison: &wt::Comparison,
        positions: usize,
    ) -> Result<Vec<Metric>, PluginFailure> {
        let mut guard = self.lock();
        let live = match guard.take() {
            Some(live) => live,
            None => self.instantiate().map_err(|e| match e {
                SetupError::Instantiate(m) => PluginFailure::Trap(format!("re-instantiating: {m}")),
                SetupError::Configure(m) => PluginFailure::Trap(format!("re-configuring: {m}")),
            })?,
        };
        let Live {
            mut store,
            bindings,
        } = live;
        store.data_mut().begin_call();
        store.set_epoch_deadline(deadline_ticks(self.timeout));
        let result = bindings.call_compare(&mut store, comparison);
        store.data_mut().flush_output();
        match result {
            Ok(returned) => {
                // The instance is healthy: keep it, whatever it returned.
                *guard = Some(Live { store, bindings });
                match returned {
                    Ok(metrics) => convert_metrics(metrics, positions),
                    Err(message) => Err(PluginFailure::Returned(escape(&message))),
                }
            }
            Err(e) => {
                // Trap, timeout or out of memory: the instance is dropped (guard stays None).
                let state = store.data();
                Err(if is_timeout(&e) {
                    PluginFailure::Timeout
                } else if state.limiter.exceeded {
                    PluginFailure::OutOfMemory
                } else {
                    PluginFailure::Trap(describe_error(&e, state, self.timeout))
                })
            }
        }
    }
}

/// Epoch ticks for a deadline of `timeout` (rounded up, plus the tick already under way).
fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1)
}

fn is_timeout(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<Trap>() == Some(&Trap::Interrupt)
}

/// A trap as one line: the error chain, and the last thing the plugin wrote to stderr (a Rust
/// panic message, a Python traceback's last line).
fn describe_error(e: &wasmtime::Error, state: &PluginState, timeout: Duration) -> String {
    if is_timeout(e) {
        return format!("timed out after {timeout:?}");
    }
    if state.limiter.exceeded {
        return "ran out of memory".into();
    }
    let mut text = match e.downcast_ref::<Trap>() {
        Some(trap) => format!("{trap}"),
        None => format!("{e:#}"),
    };
    if let Some(last) = &state.last_stderr_line {
        text.push_str(" (stderr: ");
        text.push_str(last);
        text.push(')');
    }
    escape(&text)
}

/// Checks and converts what a plugin returned.
fn convert_metrics(
    metrics: Vec<wt::Metric>,
    positions: usize,
) -> Result<Vec<Metric>, PluginFailure> {
    let mut out = Vec::with_capacity(metrics.len());
    for m in metrics {
        let valid_name = !m.name.is_empty()
            && m.name.len() <= 64
            && m.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid_name {
            return Err(PluginFailure::Returned(format!(
                "metric name `{}` is not 1 to 64 of [a-z0-9_]",
                escape(&m.name)
            )));
        }
        if out.iter().any(|o: &Metric| o.name == m.name) {
            return Err(PluginFailure::Returned(format!(
                "metric `{}` returned twice",
                m.name
            )));
        }
        let value = match m.value {
            wt::Value::Scalar(v) => MetricValue::Scalar(v),
            wt::Value::PerPosition(v) => {
                if v.len() != positions {
                    return Err(PluginFailure::Returned(format!(
                        "metric `{}` has {} values for {positions} positions",
                        m.name,
                        v.len()
                    )));
                }
                MetricValue::PerPosition(v)
            }
        };
        out.push(Metric {
            name: m.name,
            help: escape(&m.help),
            value,
        });
    }
    Ok(out)
}

/// The loaded plugins, in config order.
pub struct PluginSet {
    plugins: Vec<LoadedPlugin>,
}

impl PluginSet {
    /// Loads every plugin; the first that fails to load fails the set (its error names it).
    pub fn load(host: &PluginHost, specs: &[PluginSpec]) -> Result<PluginSet, PluginError> {
        let plugins = specs
            .iter()
            .map(|spec| host.load(spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PluginSet { plugins })
    }

    /// A set with no plugin (compare returns nothing).
    pub fn empty() -> PluginSet {
        PluginSet {
            plugins: Vec::new(),
        }
    }

    /// Hands the record to every plugin in order; one outcome per plugin, in the same order.
    /// A plugin's failure does not affect the others.
    pub fn compare(&self, record: &AlignedRecord) -> Vec<PluginOutcome> {
        if self.plugins.is_empty() {
            return Vec::new();
        }
        let comparison = to_wit(record);
        self.plugins
            .iter()
            .map(|p| p.call(&comparison, record.positions.len()))
            .collect()
    }

    /// The plugins' names, in config order.
    pub fn names(&self) -> Vec<String> {
        self.plugins.iter().map(|p| p.name.clone()).collect()
    }

    /// The loaded plugins, in config order.
    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    pub fn len(&self) -> usize {
        self.plugins.len()
    }
}

/// The record as the WIT `comparison`: per position numbers only, the texts once.
fn to_wit(r: &AlignedRecord) -> wt::Comparison {
    let top = |list: &[crate::record::TopLogprob]| -> Vec<wt::TokenLogprob> {
        list.iter()
            .map(|t| wt::TokenLogprob {
                id: t.id,
                logprob: t.logprob,
            })
            .collect()
    };
    wt::Comparison {
        id: r.id.clone(),
        endpoint: r.endpoint.as_str().to_string(),
        main_model: r.main_model.clone(),
        candidate_model: r.candidate_model.clone(),
        prompt_tokens: r.prompt_tokens,
        strategy: r.strategy.as_str().to_string(),
        candidate_requests: r.candidate_requests,
        candidate_tokens_decoded: r.candidate_tokens_decoded,
        finish_reason: r.finish_reason.clone(),
        positions: r
            .positions
            .iter()
            .map(|p| wt::Position {
                index: p.index,
                main: wt::TokenLogprob {
                    id: p.main.id,
                    logprob: p.main.logprob,
                },
                main_top: top(&p.main_top),
                candidate: p.candidate,
                candidate_top: top(&p.candidate_top),
                candidate_pick: p.candidate_pick,
                request: p.request,
                status: match p.status {
                    PositionStatus::Aligned => wt::PositionStatus::Aligned,
                    PositionStatus::Unaligned => wt::PositionStatus::Unaligned,
                    PositionStatus::Speculative => wt::PositionStatus::Speculative,
                    PositionStatus::Uncovered => wt::PositionStatus::Uncovered,
                },
            })
            .collect(),
        texts: r
            .texts
            .iter()
            .map(|t| wt::TokenText {
                id: t.id,
                text: t.text.clone(),
            })
            .collect(),
    }
}

/// Bounds an instance's memory (all its linear memories together) and its tables.
struct MemoryLimiter {
    limit: u64,
    /// Bytes of linear memory granted so far (memories only grow).
    granted: u64,
    /// Set when a growth was refused: a failure that follows is reported as out of memory.
    exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self
            .granted
            .saturating_sub(current as u64)
            .saturating_add(desired as u64);
        if after > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        self.granted = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Everything one instance's store holds.
struct PluginState {
    /// The plugin's name, on every log line it causes.
    name: String,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    /// Log bytes still allowed in the current call.
    log_budget: usize,
    /// Log bytes dropped in the current call for want of budget.
    log_dropped: usize,
    /// The last line written to stderr, quoted in a trap's description.
    last_stderr_line: Option<String>,
}

impl PluginState {
    fn new(name: String, memory_limit: u64) -> PluginState {
        let stdout = CapturedOutput::default();
        let stderr = CapturedOutput::default();
        // No preopens, env, args or network; stdin closed; stdout/stderr captured.
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        PluginState {
            name,
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: memory_limit,
                granted: 0,
                exceeded: false,
            },
            stdout,
            stderr,
            log_budget: LOG_BUDGET_PER_CALL,
            log_dropped: 0,
            last_stderr_line: None,
        }
    }

    fn begin_call(&mut self) {
        // A refusal in an earlier call that the plugin survived says nothing about this one.
        self.limiter.exceeded = false;
        self.log_budget = LOG_BUDGET_PER_CALL;
        self.log_dropped = 0;
        self.last_stderr_line = None;
    }

    /// Takes from the log budget; false when the message must be dropped.
    fn spend(&mut self, bytes: usize) -> bool {
        if bytes > self.log_budget {
            self.log_dropped += bytes;
            self.log_budget = 0;
            return false;
        }
        self.log_budget -= bytes;
        true
    }

    /// Forwards what the plugin printed to `tracing`, one event per line.
    fn flush_output(&mut self) {
        let (out, out_dropped) = self.stdout.take();
        let (err, err_dropped) = self.stderr.take();
        for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if self.spend(line.len()) {
                let text = escape(&String::from_utf8_lossy(line));
                tracing::info!(target: LOG_TARGET, plugin = %self.name, stream = "stdout", "{text}");
            }
        }
        for line in err.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let text = escape(&String::from_utf8_lossy(line));
            if self.spend(line.len()) {
                tracing::warn!(target: LOG_TARGET, plugin = %self.name, stream = "stderr", "{text}");
            }
            self.last_stderr_line = Some(text);
        }
        let dropped = out_dropped + err_dropped + std::mem::take(&mut self.log_dropped);
        if dropped > 0 {
            tracing::warn!(target: LOG_TARGET, plugin = %self.name, dropped_bytes = dropped, "plugin output over the per-call budget was dropped");
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wt::Host for PluginState {}

impl wit::kl_proxy::comparator::host::Host for PluginState {
    fn log(&mut self, level: Level, message: String) {
        if !self.spend(message.len()) {
            return;
        }
        let text = escape(&message);
        let name = &self.name;
        match level {
            Level::Debug => tracing::debug!(target: LOG_TARGET, plugin = %name, "{text}"),
            Level::Info => tracing::info!(target: LOG_TARGET, plugin = %name, "{text}"),
            Level::Warn => tracing::warn!(target: LOG_TARGET, plugin = %name, "{text}"),
            Level::Error => tracing::error!(target: LOG_TARGET, plugin = %name, "{text}"),
        }
    }
}

/// A plugin's text made safe for one log line: control characters (newlines included) and
/// bidirectional-override characters escaped, cut at [`MAX_LOG_LINE`] bytes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LOG_LINE) + 8);
    for (i, c) in text.char_indices() {
        if out.len() >= MAX_LOG_LINE {
            out.push_str(&format!("... ({} bytes cut)", text.len() - i));
            break;
        }
        let dangerous = c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if dangerous {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// stdout or stderr of an instance: kept in memory (bounded) until the host forwards it.
#[derive(Clone, Default)]
struct CapturedOutput {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
}

impl CapturedOutput {
    /// Appends up to the per-call budget; what does not fit is counted, never an error (a
    /// plugin must not trap because it printed too much).
    fn append(&self, data: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = LOG_BUDGET_PER_CALL.saturating_sub(c.bytes.len());
        let n = room.min(data.len());
        c.bytes.extend_from_slice(&data[..n]);
        c.dropped += data.len() - n;
    }

    /// What was written since the last take, and the bytes dropped.
    fn take(&self) -> (Vec<u8>, usize) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut c.bytes), std::mem::take(&mut c.dropped))
    }
}

impl wasmtime_wasi::cli::IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl wasmtime_wasi::p2::OutputStream for CapturedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        // Always writable: overflow is dropped in `append`.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_one_line() {
        assert_eq!(escape("a\nb\r\x1b[31m"), "a\\nb\\r\\u{1b}[31m");
        assert_eq!(escape("plain ünïcode"), "plain ünïcode");
        assert_eq!(escape("rtl\u{202e}x"), "rtl\\u{202e}x");
        let long = "x".repeat(MAX_LOG_LINE + 10);
        assert!(escape(&long).ends_with("... (10 bytes cut)"));
    }

    #[test]
    fn deadline_rounds_up() {
        assert_eq!(deadline_ticks(Duration::from_millis(200)), 21);
        assert_eq!(deadline_ticks(Duration::from_millis(1)), 2);
        assert_eq!(deadline_ticks(Duration::ZERO), 1);
    }

    #[test]
    fn limiter_counts_all_memories() {
        let mut l = MemoryLimiter {
            limit: 1 << 20,
            granted: 0,
            exceeded: false,
        };
        assert!(l.memory_growing(0, 512 << 10, None).unwrap());
        assert!(l.memory_growing(0, 512 << 10, None).unwrap());
        assert!(!l.memory_growing(512 << 10, 576 << 10, None).unwrap());
        assert!(l.exceeded);
    }

    #[test]
    fn plugin_set_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PluginSet>();
        assert_send_sync::<PluginHost>();
    }
}
