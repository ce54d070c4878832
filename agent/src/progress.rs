//! Progress bars that vanish when output is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` units named `what`, drawn on stderr when `show` and stderr is a terminal. Its
/// message (`set_message`: the latest numbers, e.g. a training iteration's return and CPU) is
/// drawn on a second line under the bar.
pub fn bar(len: u64, what: &str, show: bool) -> ProgressBar {
    let b = ProgressBar::new(len);
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        b.set_draw_target(ProgressDrawTarget::hidden());
    }
    b.set_style(
        ProgressStyle::with_template(&template(what)).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

fn template(what: &str) -> String {
    format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {what} (ETA {{eta}})\n  {{wide_msg}}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_valid_and_shows_the_message() {
        // An invalid template would fall back, silently, to a bar without the numbers.
        let t = template("iterations");
        assert!(ProgressStyle::with_template(&t).is_ok(), "{t}");
        assert!(t.contains("{wide_msg}") && t.contains("{pos}/{len} iterations"), "{t}");
    }
}
