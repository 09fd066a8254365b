//! The command line: argument parsing with clap, and one function per subcommand that loads
//! the config and calls into the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kl-proxy",
    version,
    about = "Measure, on live traffic, how far a candidate LLM is from the model in production"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = "config.yaml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Send a prompt set through the proxy and print what the comparisons found.
    Eval {
        /// A JSONL file: one chat request (`{"messages": [...]}`) per line.
        #[arg(long)]
        prompts: PathBuf,
        /// Requests sent at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Summarise the stored comparisons as llama-perplexity --kl-divergence does.
    Report {
        #[command(flatten)]
        source: StoreArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write one row per stored position to a file pandas, DuckDB or Polars read directly.
    Export {
        #[command(flatten)]
        source: StoreArgs,
        /// jsonl, csv or parquet.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Work with comparator plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

/// Which store to read, and from when.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The SQLite store (default: the config's `store.path`).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Only comparisons from this long ago on (e.g. 30m, 2h), or since this Unix time in ms.
    #[arg(long)]
    pub since: Option<String>,
}

impl StoreArgs {
    fn open(&self, config: &std::path::Path) -> anyhow::Result<(crate::store::Store, u64)> {
        let store_config = match crate::config::Config::load(config) {
            Ok(c) => c.store,
            Err(e) if self.db.is_some() => {
                tracing::debug!(error = %e, "config not used: --db given");
                crate::config::Config::from_yaml("target_host: http://127.0.0.1:1", None)?.store
            }
            Err(e) => return Err(e.into()),
        };
        let path = match (&self.db, &store_config.path) {
            (Some(p), _) | (None, Some(p)) => p.clone(),
            (None, None) => anyhow::bail!("no store: give --db or set store.path in the config"),
        };
        anyhow::ensure!(path.exists(), "no store at {}", path.display());
        let since = match self.since.as_deref() {
            None => 0,
            Some(s) => match s.parse::<u64>() {
                Ok(ms) => ms,
                Err(_) => {
                    let d = crate::config::parse_duration(s).ok_or_else(|| {
                        anyhow::anyhow!("--since `{s}`: give a duration (30m, 2h) or Unix ms")
                    })?;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis() as u64;
                    now.saturating_sub(d.as_millis() as u64)
                }
            },
        };
        Ok((crate::store::Store::open(&path, store_config)?, since))
    }
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Say whether a file is a valid comparator component, and which interface version.
    Check { file: PathBuf },
}

/// Runs the parsed command line; the process exits with an error when this fails.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = crate::config::Config::load(&cli.config)?;
            crate::service::serve_forever(config).await
        }
        Command::Eval {
            prompts,
            concurrency,
        } => {
            let config = crate::config::Config::load(&cli.config)?;
            let summary = crate::eval::run(config, &prompts, concurrency).await?;
            println!("{summary}");
            Ok(())
        }
        Command::Report { source, json } => {
            let (store, since) = source.open(&cli.config)?;
            let report = crate::stats::build_report(&store.report_input(since)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Export {
            source,
            format,
            out,
        } => {
            let format: crate::export::ExportFormat = format.parse()?;
            let (store, since) = source.open(&cli.config)?;
            let rows = store.position_rows(since)?;
            let n = crate::export::write_rows(format, &rows, &out)?;
            println!("{n} rows written to {}", out.display());
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => {
            let version = crate::plugins::check(&file)?;
            println!("{}: a comparator component ({version})", file.display());
            Ok(())
        }
    }
}
