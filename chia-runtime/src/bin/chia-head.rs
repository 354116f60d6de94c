//! `chia-head`: the cluster's scheduler and object store. It needs no user code.

use chia_runtime::internals::HeadOptions;
use chia_runtime::internals::members::{self, MAX_VALID_DAYS};
use chia_runtime::internals::tls::{DEFAULT_MEMBER_NAME, HeadCredentials};
use chia_runtime::internals::{HeadWithNode, default_state_dir};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Runs the head of a chia cluster. On first start it creates the cluster's CA and
/// credentials in the state directory and writes `cluster.yaml` there: give that file to
/// workers (--cluster-file) and drivers (CHIA_CLUSTER_FILE); it is the cluster's secret.
/// `issue-member` gives one worker or driver a certificate of its own, `revoke` takes one away.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    head: HeadArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a cluster file with a member certificate of its own for one worker or driver,
    /// signed by the cluster CA kept in the state directory. Revoke it with `chia-head revoke`.
    IssueMember(IssueArgs),
    /// Revokes every certificate issued to a member so far. A running head refuses them from
    /// its next handshake on (connections already open stay until they end); a certificate
    /// issued to the same name afterwards is accepted. Revoking `chia-member`, the shared
    /// certificate, also replaces it: the state directory's cluster.yaml gets the new one.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
struct IssueArgs {
    /// The member's identity: the certificate's CN and SAN, shown in the head's log (letters,
    /// digits, '-', '_', '.'; up to 64).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Days the certificate is valid from now.
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=MAX_VALID_DAYS as i64))]
    valid_days: u32,
    /// The head's state directory, holding the CA key (default: $CHIA_STATE_DIR or ~/.chia).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where to write the cluster file (default: NAME.cluster.yaml here). An existing file is
    /// not overwritten.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The host:port the member dials (default: the address in the state directory's
    /// cluster.yaml, written by the running head).
    #[arg(long, value_name = "HOST:PORT")]
    address: Option<String>,
}

#[derive(Args, Debug)]
struct RevokeArgs {
    /// The member's identity, as given to issue-member (or `chia-member`, the shared one).
    #[arg(value_name = "NAME")]
    name: String,
    /// The head's state directory (default: $CHIA_STATE_DIR or ~/.chia).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct HeadArgs {
    /// Address and UDP port to listen on.
    #[arg(long, default_value = "0.0.0.0:7470")]
    listen: SocketAddr,
    /// Where credentials and the cluster file live (default: $CHIA_STATE_DIR or ~/.chia).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The host:port peers should dial, written into cluster.yaml (default: the listen
    /// address, with 0.0.0.0 replaced by 127.0.0.1).
    #[arg(long)]
    advertise: Option<String>,
    /// Seconds without a heartbeat after which a worker is written off and its tasks run
    /// elsewhere (workers send one every second).
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Seconds a head restarted on this state directory waits for the drivers and workers of
    /// its previous run to take up their sessions (their tasks and results are kept meanwhile).
    #[arg(long, default_value_t = 60.0)]
    resume_grace: f64,
    /// MiB the journal may grow by before it starts again from a snapshot of the head's
    /// state (so a restart replays at most about this much).
    #[arg(long, default_value_t = 64.0, value_name = "MIB")]
    compact_journal_mib: f64,
    /// Seconds after which the watchdog warns of queued tasks that some node had the function
    /// and the free resources for, and that were not placed (`chia status` shows them).
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    stuck_after: f64,
    /// Serve Prometheus metrics of the whole cluster at http://HOST:PORT/metrics (off unless
    /// given; port 0 picks one, printed in the ready line). The endpoint is unauthenticated:
    /// keep it on loopback (127.0.0.1:9470) unless scrapers elsewhere must reach it.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<SocketAddr>,
}

/// `mib` MiB in bytes, if it is a size.
fn journal_bytes(mib: f64) -> Result<u64, String> {
    let bytes = mib * (1u64 << 20) as f64;
    if bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64 {
        Ok(bytes as u64)
    } else {
        Err(format!("--compact-journal-mib {mib} must be a size in MiB, such as 64 or 0.5"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = match cli.command {
        Some(Command::IssueMember(args)) => issue_member(args),
        Some(Command::Revoke(args)) => revoke(args),
        None => {
            chia_runtime::init_logging("info");
            return chia_runtime::run_main(run(cli.head));
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn issue_member(args: IssueArgs) -> Result<(), String> {
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let output = args.output.unwrap_or_else(|| PathBuf::from(format!("{}.cluster.yaml", args.name)));
    // Checked before issuing, so a refused file leaves no certificate behind in members.yaml;
    // not overwriting keeps a slip (`-o ~/.chia/cluster.yaml`) from replacing the shared file.
    if output.exists() {
        return Err(format!("{} exists; remove it or pass another -o FILE", output.display()));
    }
    let (credentials, issued) =
        members::issue_member(&state_dir, &args.name, args.valid_days, args.address.as_deref())
            .map_err(|e| e.to_string())?;
    credentials.save(&output).map_err(|e| e.to_string())?;
    println!(
        "issued a member certificate for {} (serial {}, valid until {}) for the head at {}\n\
         cluster file: {} — give it to that worker (--cluster-file) or driver (CHIA_CLUSTER_FILE); \
         `chia-head revoke {}` takes it back",
        issued.name,
        issued.serial,
        issued.not_after,
        credentials.address,
        output.display(),
        issued.name
    );
    Ok(())
}

fn revoke(args: RevokeArgs) -> Result<(), String> {
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let done = members::revoke_member(&state_dir, &args.name).map_err(|e| e.to_string())?;
    for revoked in &done.revoked {
        println!("revoked {} (certificate serial {})", revoked.name, revoked.serial);
    }
    if done.already > 0 {
        println!("{} certificate(s) of {} were revoked already", done.already, args.name);
    }
    if !done.revoked.is_empty() {
        println!(
            "a running head on {} refuses them from its next handshake; connections already open \
             stay until they end (restarting the head ends them all: its members dial again)",
            state_dir.display()
        );
    }
    if done.rotated {
        println!(
            "a new shared member certificate ({DEFAULT_MEMBER_NAME}) is in {}: give it to the \
             members that use the shared one (a running head writes it there again at its next start)",
            state_dir.join("cluster.yaml").display()
        );
    }
    Ok(())
}

async fn run(args: HeadArgs) -> Result<ExitCode, String> {
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let credentials = HeadCredentials::load_or_create(&state_dir).map_err(|e| e.to_string())?;
    let heartbeat_timeout = Duration::try_from_secs_f64(args.heartbeat_timeout)
        .ok()
        .filter(|t| *t >= Duration::from_millis(100))
        .ok_or_else(|| {
            format!("--heartbeat-timeout {} must be at least 0.1 seconds", args.heartbeat_timeout)
        })?;
    let resume_grace = Duration::try_from_secs_f64(args.resume_grace)
        .map_err(|_| format!("--resume-grace {} must be a number of seconds", args.resume_grace))?;
    let options = HeadOptions {
        heartbeat: (heartbeat_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        heartbeat_timeout,
        // The journal and detached services (the cache): a head restarted on this directory
        // takes up where it was.
        state_dir: Some(state_dir.clone()),
        resume_grace,
        compact_journal_after: journal_bytes(args.compact_journal_mib)?,
        stuck_after: Duration::try_from_secs_f64(args.stuck_after)
            .ok()
            .filter(|t| *t >= Duration::from_secs(1))
            .ok_or_else(|| format!("--stuck-after {} must be at least 1 second", args.stuck_after))?,
    };
    let started = HeadWithNode::start(args.listen, credentials, options).await.map_err(|e| e.to_string())?;
    let head = started.head();
    let address = args.advertise.unwrap_or_else(|| {
        let mut address = head.address();
        if address.ip().is_unspecified() {
            tracing::info!("listening on all interfaces; pass --advertise HOST:PORT for other machines");
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        address.to_string()
    });
    let cluster_file = state_dir.join("cluster.yaml");
    head.cluster_credentials(&address).save(&cluster_file).map_err(|e| e.to_string())?;
    let metrics = match args.metrics {
        Some(listen) => {
            let serving = head.serve_metrics(listen).await.map_err(|e| e.to_string())?;
            format!(" metrics={serving}")
        }
        None => String::new(),
    };
    println!("chia-head ready address={address} cluster_file={}{metrics}", cluster_file.display());
    wait_for_stop_signal().await;
    tracing::info!("stopping");
    head.shutdown();
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
