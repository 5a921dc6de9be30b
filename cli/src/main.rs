//! `myriad`: every role and tool of the cluster as a subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use myriad::cmd::{bench, generate, make_model};

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
    /// Offline generation on this machine (all roles in one process).
    Generate(generate::GenerateArgs),
    /// Write a random-weight model (with a trained tokenizer) in the Hugging Face layout.
    MakeModel(make_model::MakeModelArgs),
    /// Benchmarks with their ceilings measured in the same run (use a release build).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => generate::run(a),
        Command::MakeModel(a) => make_model::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
