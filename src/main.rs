//! The `netkit` binary: parses the command line, sets up logging, and makes one
//! call into the library per command.

use std::io::IsTerminal;
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
    /// Once a long-running command (serve, tcp serve, udp serve, recv, relay) has bound
    /// its sockets, print one JSON line on stdout with their addresses, e.g.
    /// {"ready":true,"http":"127.0.0.1:41234","tcp":"127.0.0.1:41235"}; doors
    /// that are off are left out.
    #[arg(long, global = true, env = "NETKIT_READY_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    ready_json: bool,
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
    /// Resolve an address for a network (tcp, tcp4, tcp6, udp, udp4, udp6, ip, ip4, ip6).
    Resolve(netkit::net::addr::ResolveArgs),
    /// Show the TCP connection table with states, like `netstat -ant`.
    Conns(netkit::net::conns::ConnsArgs),
    /// Send files and folders to `netkit recv`, verified and resumable.
    Send(netkit::transfer::send::SendArgs),
    /// Receive files and folders from `netkit send` into a folder.
    Recv(netkit::transfer::recv::RecvArgs),
    /// Download a file shared in a chat room (its link), resuming a cut
    /// download and checking its BLAKE3.
    Get(netkit::http::get::GetArgs),
    /// The relay where `netkit send` and `netkit recv CODE` meet when
    /// neither can reach the other; it only copies sealed bytes.
    Relay(netkit::transfer::relay::RelayArgs),
    /// Terminal chat client for a hub (ws://HOST:PORT/ws or tcp://HOST:PORT).
    Chat(netkit::chat::client::ChatArgs),
    /// Cluster membership as one node sees it (from its HTTP server).
    Members(netkit::cluster::members::MembersArgs),
}

#[derive(Subcommand)]
enum TcpCommand {
    /// Serve a line service (rand, echo, daytime, discard) to many clients at once.
    Serve(netkit::tcp::server::ServeArgs),
    /// Connect to a TCP server: stdin to the socket, the socket to stdout.
    Connect(netkit::tcp::client::ConnectArgs),
}

#[derive(Subcommand)]
enum UdpCommand {
    /// Answer datagrams (echo, rand, daytime).
    Serve(netkit::udp::server::ServeArgs),
    /// Send datagrams, retransmit when no reply comes, and report round trips and loss.
    Send(netkit::udp::client::SendArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    raise_fd_limit();
    if cli.ready_json {
        netkit::ready::enable();
    }

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
            Command::Tcp(TcpCommand::Connect(args)) => netkit::tcp::client::run_command(args).await,
            Command::Udp(UdpCommand::Serve(args)) => netkit::udp::server::run_command(args).await,
            Command::Udp(UdpCommand::Send(args)) => netkit::udp::client::run_command(args).await,
            Command::Resolve(args) => netkit::net::addr::run_command(args).await,
            Command::Conns(args) => netkit::net::conns::run_command(args).await,
            Command::Send(args) => netkit::transfer::send::run_command(args).await,
            Command::Recv(args) => netkit::transfer::recv::run_command(args).await,
            Command::Get(args) => netkit::http::get::run_command(args).await,
            Command::Relay(args) => netkit::transfer::relay::run_command(args).await,
            Command::Chat(args) => netkit::chat::client::run_command(args).await,
            Command::Members(args) => netkit::cluster::members::run_command(args).await,
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
        .with_ansi(std::io::stderr().is_terminal())
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
