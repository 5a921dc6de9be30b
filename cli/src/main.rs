//! `myriad`: every role and tool of the cluster as a subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use myriad::cmd::{
    bench, certs, control, gateway, generate, launch, loadtest, make_model, node, serve,
};

#[derive(Parser, Debug)]
#[command(
    name = "myriad",
    version,
    about = "Myriad: a sparse-MoE inference cluster for Qwen3.5-class models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OpenAI-compatible API with every role in this process (the embedded default).
    Serve(serve::ServeArgs),
    /// Front several attention nodes (`node attention --http`) with one OpenAI-compatible
    /// endpoint: least-loaded routing, streaming pass-through, retries, health checks.
    Gateway(gateway::GatewayArgs),
    /// Offline generation on this machine (all roles in one process).
    Generate(generate::GenerateArgs),
    /// Write a random-weight model (with a trained tokenizer) in the Hugging Face layout.
    MakeModel(make_model::MakeModelArgs),
    /// Benchmarks with their ceilings measured in the same run (use a release build).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Run one distributed role: an expert node or an attention node (`--http`: serving the
    /// OpenAI API for `myriad gateway`).
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Start a cluster on this machine: expert-node processes plus the attention side.
    Launch(launch::LaunchArgs),
    /// Load-test an OpenAI-compatible server: concurrent streams, TTFT/ITL percentiles,
    /// throughput, and a long prompt's effect on running streams.
    Loadtest(loadtest::LoadtestArgs),
    /// Write a CA and node certificates for mutual TLS between nodes.
    Certs(certs::CertsArgs),
    /// Inspect and steer the control plane: nodes, placement, status, rebalance, drain.
    #[command(subcommand)]
    Control(control::ControlCmd),
}

/// Keeps freed memory in the process: every forward step allocates activation buffers of tens
/// of megabytes, and glibc would otherwise serve them with mmap (they exceed its mmap threshold,
/// which cannot be raised past 32 MiB) and unmap them on free, page-faulting fresh zeroed pages
/// in on every step. Per-thread arenas cannot hold blocks over 64 MiB either, so the kernel
/// worker threads would churn theirs. One arena, no mmap and no trimming: freed buffers are
/// reused (measured: a repeated 4K-token prefill then takes no new page faults). Our threads
/// allocate rarely, so one arena's lock is uncontended.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_MAX: i32 = -4;
    const M_ARENA_MAX: i32 = -8;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only changes allocator tunables; called before any threads start.
    unsafe {
        mallopt(M_ARENA_MAX, 1);
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Gateway(a) => gateway::run(a),
        Command::Generate(a) => generate::run(a),
        Command::MakeModel(a) => make_model::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Node(a) => node::run(a),
        Command::Launch(a) => launch::run(a),
        Command::Loadtest(a) => loadtest::run(a),
        Command::Certs(a) => certs::run(a),
        Command::Control(a) => control::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
