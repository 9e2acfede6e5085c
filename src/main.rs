//! Command line of logbridge: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use logbridge::config::{Config, DEFAULT_CONFIG_PATH};
use logbridge::demo::{self, DemoOptions};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's allocator: records are allocated on the consumer thread and freed
/// on the runtime's threads, and glibc's per-arena locks made those frees contend (the
/// benchmark's CPU per event dropped with it; see the README's performance section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "logbridge",
    version,
    about = "Routes JSON log events from Kafka to their destinations and commits only finished work"
)]
struct Cli {
    /// Log output: `human` for terminals, `json` for production log pipelines.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline (the default, with the shipped configuration).
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file and print it with defaults filled in.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
    },
    /// Produce realistic sample events (a load generator).
    Produce(logbridge::produce::ProduceOptions),
    /// Measure throughput, CPU, memory and commits against raw librdkafka (see the README).
    Bench(logbridge::bench::BenchOptions),
    /// One benchmark measurement (run by `bench` in a child process).
    #[command(hide = true)]
    BenchChild(logbridge::bench::ChildOptions),
    /// Hosts librdkafka's mock cluster until standard input closes (used by `bench`).
    #[command(hide = true)]
    BenchBroker,
    /// Run everything against an in-process Kafka with sample traffic.
    Demo {
        /// Stop after this long, e.g. `30s`, `5m` (default: until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Address for /metrics and /healthz (default: from config/demo.toml).
        #[arg(long)]
        listen: Option<String>,
        /// Sample events per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(split) => text.split_at(split),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 500ms or 5m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit `{unit}`: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| err.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // Many concurrent HTTP clients (or a scrape storm) must not run the process out of file
    // descriptors: take the hard limit the system allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(err) => tracing::debug!(error = %err, "cannot raise the open file limit"),
    }
    let command = cli.command.unwrap_or(Command::Run {
        config: PathBuf::from(DEFAULT_CONFIG_PATH),
    });
    if let Command::BenchBroker = &command {
        return match logbridge::bench::serve_broker() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("{err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::CheckConfig { file } = &command {
        return match Config::load(file) {
            Ok(config) => {
                println!("{}", config.to_toml());
                eprintln!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{}: {err}", file.display());
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(logbridge::pipeline::cancel_on_signal(shutdown.clone()));
        match command {
            Command::Run { config } => {
                let config = Config::load(&config)?;
                logbridge::run(config, Default::default(), shutdown).await
            }
            Command::Demo {
                duration,
                listen,
                rate,
            } => {
                let options = DemoOptions {
                    duration,
                    listen,
                    rate,
                    ..DemoOptions::default()
                };
                demo::run(options, shutdown).await
            }
            Command::Produce(options) => {
                if !(0.0..=1.0).contains(&options.bad_ratio) {
                    anyhow::bail!("--bad-ratio must be between 0.0 and 1.0");
                }
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let on_signal = stop.clone();
                let token = shutdown.clone();
                tokio::spawn(async move {
                    token.cancelled().await;
                    on_signal.store(true, std::sync::atomic::Ordering::Relaxed);
                });
                logbridge::produce::run(options, stop).await.map(|_| ())
            }
            // Ctrl-C ends a benchmark at once: dropping it kills its children and the helper
            // broker (they are spawned with kill_on_drop).
            Command::Bench(options) => tokio::select! {
                result = logbridge::bench::run(options) => result,
                _ = shutdown.cancelled() => Err(anyhow::anyhow!("benchmark interrupted")),
            },
            Command::BenchChild(options) => tokio::select! {
                result = logbridge::bench::run_child(options) => result,
                _ = shutdown.cancelled() => Err(anyhow::anyhow!("measurement interrupted")),
            },
            Command::CheckConfig { .. } | Command::BenchBroker => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "logbridge failed");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LOGBRIDGE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
