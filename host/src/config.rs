//! The configuration: `config.yaml` as the user writes it ([`RawConfig`], every key optional,
//! unknown keys refused) resolved by [`Config::load`] into a validated [`Config`] with the
//! defaults applied. Every error names the file and the key that is wrong.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

/// A config that cannot be used, with the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("config file {file}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// The file as written: every key optional so that defaults and messages are ours.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub target_host: Option<String>,
    pub candidate_host: Option<String>,
    pub n_probs: Option<u32>,
    pub port: Option<u16>,
    pub listen: Option<String>,
    pub candidate_max_tokens: Option<u32>,
    pub strip_logprobs: Option<bool>,
    pub sample_rate: Option<f64>,
    pub queue_capacity: Option<usize>,
    pub candidate_concurrency: Option<usize>,
    pub candidate_timeout: Option<serde_yaml::Value>,
    pub target_timeout: Option<serde_yaml::Value>,
    pub shutdown_timeout: Option<serde_yaml::Value>,
    pub strategy: Option<String>,
    pub max_body_bytes: Option<serde_yaml::Value>,
    pub max_capture_tokens: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_capture_bytes: Option<serde_yaml::Value>,
    pub candidate_api_key: Option<String>,
    pub candidate_headers: Option<BTreeMap<String, String>>,
    pub forward_client_auth_to_candidate: Option<bool>,
    pub plugins: Option<Vec<RawPlugin>>,
    pub plugin_timeout: Option<serde_yaml::Value>,
    pub plugin_memory_limit: Option<serde_yaml::Value>,
    pub plugin_cache_dir: Option<String>,
    pub store: Option<RawStore>,
    pub admin: Option<RawAdmin>,
    pub histogram_buckets: Option<Vec<f64>>,
}

/// `store:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub path: Option<String>,
    pub keep_text: Option<bool>,
    pub max_age: Option<serde_yaml::Value>,
    pub max_rows: Option<u64>,
}

/// `admin:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<String>,
}

/// Where comparisons are kept (see `store`).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// SQLite file; `None` when `store.path` is empty (nothing kept).
    pub path: Option<PathBuf>,
    /// Keep prompt and token texts; off: ids and numbers only.
    pub keep_text: bool,
    /// Comparisons older than this are deleted.
    pub max_age: Option<Duration>,
    /// At most this many comparisons are kept (the oldest go first).
    pub max_rows: Option<u64>,
}

/// The admin listener (metrics, API, dashboard).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where it listens; `None` when `admin.listen` is empty (no admin listener).
    pub listen: Option<SocketAddr>,
    /// Bearer token required on every admin request, when set.
    pub token: Option<String>,
}

/// One entry of `plugins:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub options: serde_yaml::Value,
}

/// A duration written as seconds (`30`, `0.5`) or with a unit (`200ms`, `30s`, `2m`).
#[derive(Debug, Clone, Copy)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Seconds(f64),
            Text(String),
        }
        let err = |s: &str| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration (write e.g. 200ms, 30s, 2m or a number of seconds)"
            ))
        };
        match Repr::deserialize(d)? {
            Repr::Seconds(s) if s.is_finite() && s >= 0.0 => {
                Ok(DurationValue(Duration::from_secs_f64(s)))
            }
            Repr::Seconds(s) => Err(err(&s.to_string())),
            Repr::Text(t) => parse_duration(&t).map(DurationValue).ok_or_else(|| err(&t)),
        }
    }
}

pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// A size written in bytes (`1048576`) or with a unit (`64MiB`, `16MB`, `512KiB`).
#[derive(Debug, Clone, Copy)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bytes(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Bytes(b) => Ok(ByteSize(b)),
            Repr::Text(t) => parse_size(&t).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a size (write e.g. 64MiB, 16MB or a number of bytes)"
                ))
            }),
        }
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then_some((n * mult) as u64)
}

/// How the candidate is asked to score a response (see `candidate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyChoice {
    /// Forced where the candidate supports `/completion` with token ids, else chat.
    Forced,
    /// The seed's chunked greedy continuation.
    Chunked,
    /// OpenAI chat API with a partial assistant message (no token ids needed).
    Chat,
}

/// A comparator plugin to load.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    /// Name used in logs, metrics and stored results.
    pub name: String,
    /// Path of the `.wasm` component (relative paths are resolved against the config file).
    pub path: PathBuf,
    /// Free-form options, handed to the plugin's `configure` as JSON.
    pub options: serde_json::Value,
}

/// The validated configuration, defaults applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages and for reloading).
    pub file: Option<PathBuf>,
    /// Base URL of the main model server every request is forwarded to.
    pub target_host: Uri,
    /// Base URL of the candidate model server.
    pub candidate_host: Uri,
    /// Top-N log-probabilities requested from both models.
    pub n_probs: u32,
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Tokens per candidate request in the chunked strategy.
    pub candidate_max_tokens: u32,
    /// Remove logprobs the client did not ask for from what it receives.
    pub strip_logprobs: bool,
    /// Fraction of scored requests that are compared (0..=1).
    pub sample_rate: f64,
    /// Comparison jobs waiting at most; more are dropped and counted.
    pub queue_capacity: usize,
    /// Comparisons run at once against the candidate.
    pub candidate_concurrency: usize,
    /// Bound on each candidate HTTP request.
    pub candidate_timeout: Duration,
    /// Bound on waiting for the target's response head (none by default: generation can be long).
    pub target_timeout: Option<Duration>,
    /// How long shutdown waits for in-flight comparisons.
    pub shutdown_timeout: Duration,
    /// The candidate strategy asked for.
    pub strategy: StrategyChoice,
    /// Largest request body accepted on a scored endpoint (413 above).
    pub max_body_bytes: u64,
    /// Longest main response (tokens) captured for comparison; longer ones are not compared.
    pub max_capture_tokens: usize,
    /// Most bytes the tee holds for one response (an SSE line, a JSON answer); a larger one
    /// passes through and is not compared.
    pub max_capture_bytes: usize,
    /// Client connections open at once; more are answered 503.
    pub max_connections: usize,
    /// Bearer token sent to the candidate.
    pub candidate_api_key: Option<String>,
    /// Extra headers sent to the candidate.
    pub candidate_headers: Vec<(String, String)>,
    /// Send the client's `Authorization` to the candidate too (off by default).
    pub forward_client_auth_to_candidate: bool,
    /// Comparator plugins, in order.
    pub plugins: Vec<PluginSpec>,
    /// Bound on each plugin call.
    pub plugin_timeout: Duration,
    /// Bound on each plugin instance's memory.
    pub plugin_memory_limit: u64,
    /// Where compiled plugins are cached (none: compile at every load).
    pub plugin_cache_dir: Option<PathBuf>,
    /// The record store.
    pub store: StoreConfig,
    /// The admin listener.
    pub admin: AdminConfig,
    /// Bucket bounds of the Prometheus histograms of per-position plugin series.
    pub histogram_buckets: Vec<f64>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text, Some(path))
    }

    /// Parses and validates config text; `file` names it in errors and anchors relative paths.
    pub fn from_yaml(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let fname = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<config>"));
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                file: fname.clone(),
                message: e.to_string(),
            })?
        };
        raw.resolve(file)
    }
}

impl RawConfig {
    /// Applies defaults and checks every value.
    pub fn resolve(self, file: Option<&Path>) -> Result<Config, ConfigError> {
        let fname = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<config>"));
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            file: fname.clone(),
            key: key.to_owned(),
            message,
        };
        // Durations and sizes are read here, where the key is known for the message.
        let duration =
            |key: &str, v: Option<serde_yaml::Value>| -> Result<Option<Duration>, ConfigError> {
                v.map(|v| {
                    serde_yaml::from_value::<DurationValue>(v)
                        .map(|d| d.0)
                        .map_err(|e| invalid(key, e.to_string()))
                })
                .transpose()
            };
        let size = |key: &str, v: Option<serde_yaml::Value>| -> Result<Option<u64>, ConfigError> {
            v.map(|v| {
                serde_yaml::from_value::<ByteSize>(v)
                    .map(|b| b.0)
                    .map_err(|e| invalid(key, e.to_string()))
            })
            .transpose()
        };
        let candidate_timeout = duration("candidate_timeout", self.candidate_timeout)?;
        let target_timeout = duration("target_timeout", self.target_timeout)?;
        let shutdown_timeout = duration("shutdown_timeout", self.shutdown_timeout)?;
        let plugin_timeout = duration("plugin_timeout", self.plugin_timeout)?;
        let max_body_bytes = size("max_body_bytes", self.max_body_bytes)?;
        let plugin_memory_limit = size("plugin_memory_limit", self.plugin_memory_limit)?;
        let max_capture_bytes = size("max_capture_bytes", self.max_capture_bytes)?;
        let base_dir = file
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();

        let target_host = match self.target_host {
            Some(t) => parse_base_url(&t).map_err(|m| invalid("target_host", m))?,
            None => {
                return Err(invalid(
                    "target_host",
                    "is required: the URL of the main model server, e.g. http://127.0.0.1:8080"
                        .into(),
                ))
            }
        };
        let candidate_host = parse_base_url(
            self.candidate_host
                .as_deref()
                .unwrap_or("http://localhost:8081"),
        )
        .map_err(|m| invalid("candidate_host", m))?;

        let n_probs = self.n_probs.unwrap_or(10);
        if n_probs == 0 {
            return Err(invalid("n_probs", "must be at least 1".into()));
        }
        let candidate_max_tokens = self.candidate_max_tokens.unwrap_or(8);
        if candidate_max_tokens == 0 {
            return Err(invalid("candidate_max_tokens", "must be at least 1".into()));
        }
        let ip: IpAddr = self
            .listen
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .map_err(|_| invalid("listen", "must be an IP address such as 127.0.0.1".into()))?;
        let listen = SocketAddr::new(ip, self.port.unwrap_or(8088));

        let sample_rate = self.sample_rate.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(invalid("sample_rate", "must be between 0 and 1".into()));
        }
        let queue_capacity = self.queue_capacity.unwrap_or(256);
        if queue_capacity == 0 {
            return Err(invalid("queue_capacity", "must be at least 1".into()));
        }
        let candidate_concurrency = self.candidate_concurrency.unwrap_or(1);
        if candidate_concurrency == 0 {
            return Err(invalid(
                "candidate_concurrency",
                "must be at least 1".into(),
            ));
        }
        let strategy = match self.strategy.as_deref().unwrap_or("forced") {
            "forced" => StrategyChoice::Forced,
            "chunked" => StrategyChoice::Chunked,
            "chat" => StrategyChoice::Chat,
            other => {
                return Err(invalid(
                    "strategy",
                    format!("`{other}` is not one of forced, chunked, chat"),
                ))
            }
        };
        let mut candidate_headers = Vec::new();
        for (k, v) in self.candidate_headers.unwrap_or_default() {
            http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| invalid("candidate_headers", format!("`{k}` is not a header name")))?;
            http::HeaderValue::from_str(&v).map_err(|_| {
                invalid(
                    "candidate_headers",
                    format!("the value of `{k}` is not a valid header value"),
                )
            })?;
            candidate_headers.push((k, v));
        }

        let mut plugins = Vec::new();
        for (i, p) in self.plugins.unwrap_or_default().into_iter().enumerate() {
            let key = format!("plugins[{i}]");
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("`{}` must be non-empty letters, digits, `_` or `-`", p.name),
                ));
            }
            if plugins.iter().any(|q: &PluginSpec| q.name == p.name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("`{}` is used twice", p.name),
                ));
            }
            let options = serde_json::to_value(&p.options).map_err(|e| {
                invalid(
                    &format!("{key}.options"),
                    format!("cannot be expressed as JSON: {e}"),
                )
            })?;
            let path = PathBuf::from(&p.path);
            let path = if path.is_relative() {
                base_dir.join(path)
            } else {
                path
            };
            plugins.push(PluginSpec {
                name: p.name,
                path,
                options,
            });
        }

        let store = self.store.unwrap_or_default();
        let store_max_age = duration("store.max_age", store.max_age.clone())?;
        let store_path = match store.path.as_deref() {
            Some("") => None,
            p => {
                let p = PathBuf::from(p.unwrap_or("kl-proxy.db"));
                Some(if p.is_relative() { base_dir.join(p) } else { p })
            }
        };
        if store.max_rows == Some(0) {
            return Err(invalid("store.max_rows", "must be at least 1".into()));
        }
        let admin = self.admin.unwrap_or_default();
        let admin_listen = match admin.listen.as_deref() {
            Some("") => None,
            a => Some(
                a.unwrap_or("127.0.0.1:8089")
                    .parse::<SocketAddr>()
                    .map_err(|_| {
                        invalid(
                            "admin.listen",
                            "must be an address such as 127.0.0.1:8089".into(),
                        )
                    })?,
            ),
        };
        if admin.token.as_deref() == Some("") {
            return Err(invalid(
                "admin.token",
                "must not be empty (leave it out instead)".into(),
            ));
        }
        let histogram_buckets = self
            .histogram_buckets
            .unwrap_or_else(|| vec![1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]);
        if histogram_buckets.is_empty()
            || histogram_buckets.windows(2).any(|w| w[0] >= w[1])
            || histogram_buckets.iter().any(|b| !b.is_finite())
        {
            return Err(invalid(
                "histogram_buckets",
                "must be a non-empty list of increasing finite numbers".into(),
            ));
        }

        Ok(Config {
            store: StoreConfig {
                path: store_path,
                keep_text: store.keep_text.unwrap_or(true),
                max_age: store_max_age,
                max_rows: store.max_rows,
            },
            admin: AdminConfig {
                listen: admin_listen,
                token: admin.token,
            },
            histogram_buckets,
            file: file.map(Path::to_path_buf),
            target_host,
            candidate_host,
            n_probs,
            listen,
            candidate_max_tokens,
            strip_logprobs: self.strip_logprobs.unwrap_or(true),
            sample_rate,
            queue_capacity,
            candidate_concurrency,
            candidate_timeout: candidate_timeout.unwrap_or(Duration::from_secs(60)),
            target_timeout,
            shutdown_timeout: shutdown_timeout.unwrap_or(Duration::from_secs(10)),
            strategy,
            max_body_bytes: max_body_bytes.unwrap_or(16 << 20),
            max_capture_tokens: self.max_capture_tokens.unwrap_or(8192),
            max_capture_bytes: max_capture_bytes
                .map_or(crate::capture::DEFAULT_MAX_HELD, |b| b.max(1) as usize),
            max_connections: match self.max_connections {
                Some(0) => return Err(invalid("max_connections", "must be at least 1".into())),
                n => n.unwrap_or(10_000),
            },
            candidate_api_key: self.candidate_api_key,
            candidate_headers,
            forward_client_auth_to_candidate: self
                .forward_client_auth_to_candidate
                .unwrap_or(false),
            plugins,
            plugin_timeout: plugin_timeout.unwrap_or(Duration::from_millis(200)),
            plugin_memory_limit: plugin_memory_limit.unwrap_or(64 << 20),
            plugin_cache_dir: self.plugin_cache_dir.map(|d| {
                let p = PathBuf::from(d);
                if p.is_relative() {
                    base_dir.join(p)
                } else {
                    p
                }
            }),
        })
    }
}

/// Checks that `text` is an absolute http(s) URL with a host and no query; strips a trailing `/`.
fn parse_base_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .trim_end_matches('/')
        .parse()
        .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{text}`: https upstreams are not supported yet; put a TLS terminator in front"
            ))
        }
        _ => return Err(format!("`{text}` must start with http://")),
    }
    if uri.host().is_none() {
        return Err(format!("`{text}` has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{text}` must not have a query string"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_yaml(text, Some(Path::new("my.yaml")))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::from_yaml("target_host: http://127.0.0.1:8080\n", None).unwrap();
        assert_eq!(c.candidate_host, "http://localhost:8081");
        assert_eq!(c.n_probs, 10);
        assert_eq!(c.listen, "127.0.0.1:8088".parse().unwrap());
        assert_eq!(c.candidate_max_tokens, 8);
        assert_eq!(c.queue_capacity, 256);
        assert_eq!(c.plugin_timeout, Duration::from_millis(200));
        assert_eq!(c.plugin_memory_limit, 64 << 20);
        assert!(c.strip_logprobs);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = err("target_host: http://x:1\nbogus: 3\n");
        assert!(e.contains("my.yaml") && e.contains("bogus"), "{e}");
        let e = err("target_host: http://x:1\nport: lots\n");
        assert!(e.contains("my.yaml") && e.contains("port"), "{e}");
        let e = err("target_host: ftp://x\n");
        assert!(e.contains("target_host") && e.contains("http://"), "{e}");
        let e = err("port: 9000\n");
        assert!(e.contains("target_host") && e.contains("required"), "{e}");
        let e = err("target_host: http://x:1\nsample_rate: 2\n");
        assert!(e.contains("sample_rate"), "{e}");
        let e = err("target_host: http://x:1\ncandidate_timeout: soon\n");
        assert!(e.contains("candidate_timeout") && e.contains("soon"), "{e}");
        let e = err("target_host: http://x:1\nplugins:\n  - name: a b\n    path: x.wasm\n");
        assert!(e.contains("plugins[0].name"), "{e}");
        let e = err(
            "target_host: http://x:1\nplugins:\n  - name: a\n    path: x.wasm\n    colour: red\n",
        );
        assert!(e.contains("plugins") && e.contains("colour"), "{e}");
    }

    #[test]
    fn units_parse() {
        assert_eq!(parse_duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1kb"), Some(1000));
        assert_eq!(parse_size("lots"), None);
    }
}
