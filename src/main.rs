//! Command line of logbridge: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use logbridge::config::{Config, DEFAULT_CONFIG_PATH};
use logbridge::tools::{bench, demo, produce};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's allocator: records are allocated on the consumer thread and freed
/// on the runtime's threads, and glibc's per-arena locks made those frees contend (the
/// benchmark's CPU per event dropped with it; see docs/performance.md).
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
        #[arg(long, short, env = CONFIG_VARIABLE, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file and print it with defaults filled in and secrets
    /// redacted. Exit codes: 0 valid, 2 invalid; with --connect also 3 (a cluster cannot be
    /// reached or refuses the credentials) and 4 (a topic does not exist).
    CheckConfig {
        /// Configuration file (or `--config FILE`, as `run` takes it).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Configuration file, as `run` takes it.
        #[arg(long, short, env = CONFIG_VARIABLE, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also connect to every cluster named (with its security) and check that the source,
        /// sink and dead-letter topics exist.
        #[arg(long)]
        connect: bool,
        /// How long --connect waits for each cluster, in seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        timeout: u64,
    },
    /// Produce realistic sample events (a load generator).
    Produce(produce::ProduceOptions),
    /// Measure throughput, CPU, memory and commits against raw librdkafka (see the README).
    Bench(bench::BenchOptions),
    /// One benchmark measurement (run by `bench` in a child process).
    #[command(hide = true)]
    BenchChild(bench::ChildOptions),
    /// Hosts librdkafka's mock cluster until standard input closes (used by `bench`).
    #[command(hide = true)]
    BenchBroker,
    /// Run everything against an in-process Kafka with sample traffic.
    Demo(demo::DemoOptions),
    /// Ask a running instance's /healthz (or /readyz with --ready): exit 0 if it answers 200,
    /// 1 otherwise (for container healthchecks; the image has no curl).
    Health(logbridge::tools::health::HealthOptions),
    /// Reset a tripped breaker of a running instance: POST /resume to its `http.listen` with
    /// its `http.admin_token` (read from its configuration). Exit 0 when it answers 200 or 202.
    Resume(logbridge::tools::health::ResumeOptions),
}

/// Names the configuration file when `--config` does not.
const CONFIG_VARIABLE: &str = "LOGBRIDGE_CONFIG";

fn main() -> ExitCode {
    // `--version` tells which librdkafka is inside and what it was built with (TLS, SASL,
    // codecs), which is what a connection problem is first asked about.
    let version: &'static str = Box::leak(
        format!(
            "{}\n{}",
            env!("CARGO_PKG_VERSION"),
            logbridge::cluster::librdkafka_description()
        )
        .into_boxed_str(),
    );
    let cli = match Cli::from_arg_matches(&Cli::command().version(version).get_matches()) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    init_tracing(cli.log_format);
    // Many concurrent HTTP clients (or a scrape storm) must not run the process out of file
    // descriptors: take the hard limit the system allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(err) => tracing::debug!(error = %err, "cannot raise the open file limit"),
    }
    let command = cli.command.unwrap_or_else(|| Command::Run {
        config: std::env::var_os(CONFIG_VARIABLE)
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from),
    });
    // Commands without a runtime.
    match &command {
        Command::CheckConfig {
            file,
            config,
            connect,
            timeout,
        } => {
            let Some(file) = file.as_ref().or(config.as_ref()) else {
                eprintln!(
                    "check-config needs a configuration file: `logbridge check-config --config FILE` (or FILE, or {CONFIG_VARIABLE})"
                );
                return ExitCode::from(2);
            };
            let connect = connect.then(|| std::time::Duration::from_secs(*timeout));
            return logbridge::tools::check_config(file, connect).into();
        }
        Command::Resume(options) => {
            return answered(logbridge::tools::health::resume(options));
        }
        Command::Health(options) => {
            return answered(logbridge::tools::health::health(options));
        }
        Command::BenchBroker => {
            if let Err(err) = bench::serve_broker() {
                eprintln!("{err:#}");
                return ExitCode::FAILURE;
            }
            return ExitCode::SUCCESS;
        }
        _ => {}
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
                let shown = config.clone();
                // librdkafka quotes property values in its errors: never a secret.
                logbridge::run(config, Default::default(), shutdown)
                    .await
                    .map_err(|err| anyhow::anyhow!(shown.scrub(&format!("{err:#}"))))
            }
            Command::Demo(options) => demo::run(options, shutdown).await,
            Command::Produce(options) => produce::run(options, shutdown).await.map(|_| ()),
            // Ctrl-C ends a benchmark at once: dropping it kills its children and the helper
            // broker (they are spawned with kill_on_drop).
            Command::Bench(options) => tokio::select! {
                result = bench::run(options) => result,
                _ = shutdown.cancelled() => Err(anyhow::anyhow!("benchmark interrupted")),
            },
            Command::BenchChild(options) => tokio::select! {
                result = bench::run_child(options) => result,
                _ = shutdown.cancelled() => Err(anyhow::anyhow!("measurement interrupted")),
            },
            Command::CheckConfig { .. }
            | Command::BenchBroker
            | Command::Health(_)
            | Command::Resume(_) => Ok(()),
        }
    });
    // A sink write blocked for good (stdout on a full pipe, say) must not keep the process
    // alive: blocking threads get a moment, then the process exits regardless.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
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

/// The answer of `health` or `resume`: its line on stdout and exit 0, or why not on stderr and 1.
fn answered(answer: Result<String, String>) -> ExitCode {
    match answer {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("{why}");
            ExitCode::FAILURE
        }
    }
}
