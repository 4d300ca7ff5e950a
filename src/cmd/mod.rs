//! The subcommands' front ends: arguments in, library calls, output for people or `--json`.

pub mod bench;
pub mod cache;
pub mod key;
pub mod prewarm;
