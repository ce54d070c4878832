//! # moderato-agent
//!
//! Everything that runs policies: PPO training from experiment configs, evaluation against
//! baselines, the simulator front end, the live deploy loop, and the `moderato` command line.
//! This crate alone enables autodiff and optimisers; the device is chosen here, at the edge.

/// `println!` that hands a failed write back as an error (`?`) instead of a panic: output piped
/// into `head` is closed early, and `main` takes a broken pipe as the end the reader asked for.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!("{}\n", format_args!($($t)*)))?
    };
}

pub mod deploy;
pub mod eval;
pub mod progress;
pub mod resolve;
pub mod scenarios;
pub mod simulate;
pub mod train;

/// `YYYYmmdd-HHMMSS` in UTC, for run directory names.
pub fn timestamp() -> String {
    chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string()
}
