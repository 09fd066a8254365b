//! Assembles the stages into a running service: the candidate scorer, the plugins, the
//! comparison workers and the proxy, started by [`Service::start`] and stopped in order by
//! [`Service::shutdown`] (stop accepting, finish in-flight requests, drain comparisons
//! within `shutdown_timeout`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::candidate::CandidateScorer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::plugins::{PluginHost, PluginLimits, PluginSet};
use crate::proxy::{self, Proxy};
use crate::queue::{ActivePlugins, ComparisonOutcome, ComparisonWorkers, OutcomeSinks, QueueStats};
use crate::store::StoreWriter;

/// A running proxy with its background workers.
pub struct Service {
    /// Where the proxy listens.
    pub addr: SocketAddr,
    /// Where the admin endpoints listen, when they do.
    pub admin_addr: Option<SocketAddr>,
    /// The live counters.
    pub metrics: Arc<Metrics>,
    config: Arc<Config>,
    store: Option<StoreWriter>,
    admin: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    workers: Option<ComparisonWorkers>,
    plugins: Arc<ActivePlugins>,
    plugin_host: Option<Arc<PluginHost>>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// Loads the plugins (refusing to start when one cannot be loaded), probes the candidate
    /// (a candidate that is down only delays the choice of strategy), and starts serving on
    /// `listener`.
    pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Service> {
        let config = Arc::new(config);
        let addr = listener.local_addr()?;
        let (plugin_host, plugins) = load_plugins(&config)?;
        let plugins = Arc::new(ActivePlugins::new(plugins));
        let metrics = Arc::new(Metrics::new(config.histogram_buckets.clone()));
        let store = match &config.store.path {
            Some(path) => Some(StoreWriter::start(path, config.store.clone())?),
            None => None,
        };
        let sinks = OutcomeSinks {
            metrics: Some(metrics.clone()),
            store: store.as_ref().and_then(StoreWriter::sender),
        };
        let workers = if config.sample_rate > 0.0 {
            let scorer = Arc::new(CandidateScorer::new(&config));
            match scorer.probe().await {
                Ok(report) => tracing::info!(?report, "candidate probed"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "candidate not ready at start-up; it will be probed again on the first comparison"
                ),
            }
            Some(ComparisonWorkers::start(
                config.queue_capacity,
                config.candidate_concurrency,
                scorer,
                plugins.clone(),
                sinks,
            ))
        } else {
            tracing::info!("sample_rate is 0: forwarding only, nothing is compared");
            None
        };
        let queue = workers.as_ref().map(ComparisonWorkers::queue);
        let proxy = Arc::new(Proxy::new(
            config.clone(),
            queue.clone(),
            Some(metrics.clone()),
        ));
        let stop = CancellationToken::new();
        let (admin, admin_addr) = match config.admin.listen {
            Some(at) => {
                let l = TcpListener::bind(at)
                    .await
                    .with_context(|| format!("admin.listen: cannot listen on {at}"))?;
                let admin_addr = l.local_addr()?;
                let active = plugins.clone();
                let state = Arc::new(AdminState {
                    metrics: metrics.clone(),
                    queue,
                    store: config.store.path.clone().map(|p| (p, config.store.clone())),
                    token: config.admin.token.clone(),
                    plugins: Arc::new(move || active.get().map(|s| s.names()).unwrap_or_default()),
                });
                tracing::info!(%admin_addr, "admin endpoints listening");
                let task = tokio::spawn(admin::serve(l, state, stop.clone().cancelled_owned()));
                (Some(task), Some(admin_addr))
            }
            None => (None, None),
        };
        let server = tokio::spawn(proxy::serve(
            listener,
            proxy,
            stop.clone().cancelled_owned(),
        ));
        tracing::info!(
            %addr,
            target = %config.target_host,
            candidate = %config.candidate_host,
            "kl-proxy listening"
        );
        Ok(Service {
            addr,
            admin_addr,
            metrics,
            store,
            admin,
            config,
            workers,
            plugins,
            plugin_host,
            stop,
            server,
        })
    }

    /// Every comparison outcome from now on.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Arc<ComparisonOutcome>>> {
        self.workers.as_ref().map(ComparisonWorkers::subscribe)
    }

    /// The comparison counters.
    pub fn stats(&self) -> Option<Arc<QueueStats>> {
        self.workers.as_ref().map(|w| w.queue().stats().clone())
    }

    /// Loads the plugins of `config` and swaps them in; on any error the running set stays.
    pub fn reload_plugins(&self, config: &Config) -> anyhow::Result<Vec<String>> {
        let host = match &self.plugin_host {
            Some(h) => h.clone(),
            None => Arc::new(PluginHost::new(limits(config))?),
        };
        let set = PluginSet::load(&host, &config.plugins)?;
        let names = set.names();
        self.plugins.replace(set);
        Ok(names)
    }

    /// Stops accepting, lets open requests finish, drains comparisons within the configured
    /// `shutdown_timeout`.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.server.await.context("proxy task")??;
        if let Some(w) = &self.workers {
            w.shutdown(self.config.shutdown_timeout).await;
        }
        drop(self.workers);
        if let Some(store) = self.store {
            // Writes everything the workers handed over, then stops.
            tokio::task::spawn_blocking(move || store.close()).await?;
        }
        if let Some(admin) = self.admin {
            admin.await.context("admin task")??;
        }
        Ok(())
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await
    }
}

fn limits(config: &Config) -> PluginLimits {
    PluginLimits {
        timeout: config.plugin_timeout,
        memory_limit: config.plugin_memory_limit,
        cache_dir: config.plugin_cache_dir.clone(),
    }
}

fn load_plugins(config: &Config) -> anyhow::Result<(Option<Arc<PluginHost>>, Option<PluginSet>)> {
    if config.plugins.is_empty() {
        return Ok((None, None));
    }
    let host = Arc::new(PluginHost::new(limits(config))?);
    let set = PluginSet::load(&host, &config.plugins)?;
    tracing::info!(plugins = ?set.names(), "plugins loaded");
    Ok((Some(host), Some(set)))
}

/// `kl-proxy serve`: binds the configured address, serves until SIGINT or SIGTERM, and
/// reloads the plugins when the config file changes or on SIGHUP.
pub async fn serve_forever(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let file = config.file.clone();
    let service = Arc::new(Service::start(config, listener).await?);
    let watcher = file.map(|f| tokio::spawn(watch_config(service.clone(), f)));
    shutdown_signal().await;
    if let Some(w) = watcher {
        w.abort();
        let _ = w.await;
    }
    tracing::info!("shutting down");
    match Arc::try_unwrap(service) {
        Ok(s) => s.shutdown().await,
        Err(_) => anyhow::bail!("service still in use at shutdown"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Reloads the plugins when the config file's contents change (checked every second) or
/// on SIGHUP. Only `plugins` and their options take effect without a restart.
pub async fn watch_config(service: Arc<Service>, file: std::path::PathBuf) {
    let read = |f: &std::path::Path| std::fs::read(f).ok();
    let mut last = read(&file);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let forced = match hup.as_mut() {
            Some(h) => tokio::select! {
                _ = h.recv() => true,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
            },
            None => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            false
        };
        let now = read(&file);
        if !forced && now == last {
            continue;
        }
        last = now;
        let result = Config::load(&file)
            .map_err(anyhow::Error::from)
            .and_then(|c| service.reload_plugins(&c));
        match result {
            Ok(names) => {
                tracing::info!(plugins = ?names, file = %file.display(), "plugins reloaded")
            }
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "config reload failed; the running plugins stay in place"
            ),
        }
    }
}
