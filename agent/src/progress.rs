//! Progress bars that vanish when output is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` units named `what`, drawn on stderr when `show` and stderr is a terminal.
pub fn bar(len: u64, what: &str, show: bool) -> ProgressBar {
    let b = ProgressBar::new(len);
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        b.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {what} (ETA {{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style);
    b
}
