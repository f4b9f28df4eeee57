//! Tracing overhead benchmark (in progress).
use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_a: BenchArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
