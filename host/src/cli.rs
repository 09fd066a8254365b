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
    /// Work with comparator plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
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
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => {
            let version = crate::plugins::check(&file)?;
            println!("{}: a comparator component ({version})", file.display());
            Ok(())
        }
    }
}
