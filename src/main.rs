//! The `netkit` binary: parses the command line, sets up logging, and makes one
//! call into the library per command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// A network toolkit: TCP and UDP services and clients, address resolution,
/// connection states, file transfer, a chat hub, and gossip membership.
#[derive(Parser)]
#[command(name = "netkit", version, propagate_version = true)]
struct Cli {
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the netkit server: every front door in one process.
    Serve(Box<netkit::serve::ServeArgs>),
    /// Concurrent TCP line services and an nc-like client.
    #[command(subcommand)]
    Tcp(TcpCommand),
    /// Datagram services and a client that retransmits.
    #[command(subcommand)]
    Udp(UdpCommand),
}

#[derive(Subcommand)]
enum TcpCommand {
    /// Serve a line service (rand, echo, daytime, discard) to many clients at once.
    Serve(netkit::tcp::server::ServeArgs),
}

#[derive(Subcommand)]
enum UdpCommand {
    /// Answer datagrams (echo, rand, daytime).
    Serve(netkit::udp::server::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    raise_fd_limit();

    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netkit: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => netkit::serve::run_command(*args).await,
            Command::Tcp(TcpCommand::Serve(args)) => netkit::tcp::server::run_command(args).await,
            Command::Udp(UdpCommand::Serve(args)) => netkit::udp::server::run_command(args).await,
        }
    });
    // Blocking stdin reads cannot be cancelled; do not wait for them.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netkit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = if verbose > 0 || quiet {
        EnvFilter::new(default)
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Many connections need many descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
