//! The subcommands' front ends: arguments in, library calls, output for people or `--json`.

pub mod bench;
pub mod cache;
pub mod key;
pub mod prewarm;

/// A progress bar's `{rate}`: items per second rounded for reading (`84/s`, `3.5/s`), where
/// indicatif's own `{per_sec}` prints every digit (`84.4995/s`).
pub fn rate_key(state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write) {
    let rate = state.per_sec();
    let _ = match rate {
        r if r >= 10.0 => write!(out, "{r:.0}/s"),
        r => write!(out, "{r:.1}/s"),
    };
}
