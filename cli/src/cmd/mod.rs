//! One module per subcommand.

pub mod bench;
pub mod bench_context;
pub mod bench_control;
pub mod bench_dispatch;
pub mod bench_transfer;
pub mod certs;
pub mod control;
pub mod gateway;
pub mod generate;
pub mod launch;
pub mod launch_serve;
pub mod loadtest;
pub mod make_model;
pub mod node;
pub mod serve;
