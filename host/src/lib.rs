//! # kl-proxy
//!
//! A transparent proxy in front of an LLM server that measures, on live traffic, how far a
//! candidate model is from the model in production. The client's request path is plain
//! forwarding; everything about the candidate happens in the background.
//!
//! ## Layout, in the order data flows
//! - [`config`]: the YAML config, validated at start; errors name the key and the file.
//! - [`proxy`]: the hyper server: accepts connections and forwards every request to the target.
//! - [`inject`]: rewrites a scored request (`n_probs`) and decides what the client gets back.
//! - [`capture`]: the tee on the response path: parses JSON or SSE into a [`record::MainResponse`]
//!   and strips logprobs the client did not ask for.
//! - [`queue`]: the bounded queue of comparison jobs and the workers that drain it.
//! - [`candidate`]: scores a main response under the candidate (forced / chunked / chat)
//!   into an [`record::AlignedRecord`].
//! - [`store`]: the SQLite record store and its batching writer.
//! - [`metrics`]: live counters in Prometheus format.
//! - [`admin`]: the admin listener: `/metrics` and the JSON API over the store.
//! - [`stats`]: the statistics `report` prints (llama-perplexity's formulas).
//! - [`export`]: per-position rows to JSONL, CSV or Parquet.
//! - [`plugins`]: the wasmtime host that hands records to the Wasm comparators over WIT.
//! - [`service`]: assembles the stages, runs them, reloads plugins, shuts down in order.
//! - [`record`]: the types passed between the stages.
//! - [`upstream`]: the HTTP client used to reach the target and the candidate.
//! - [`eval`]: `kl-proxy eval`: drives a prompt set through the proxy and waits for the results.
//! - [`cli`]: the command line (the binary in `main.rs` only parses and calls in here).

pub mod admin;
pub mod candidate;
pub mod capture;
pub mod cli;
pub mod config;
pub mod eval;
pub mod export;
pub mod inject;
pub mod metrics;
pub mod plugins;
pub mod proxy;
pub mod queue;
pub mod record;
pub mod service;
pub mod stats;
pub mod store;
pub mod upstream;

pub use proxy::{serve, Proxy};
pub use service::Service;
