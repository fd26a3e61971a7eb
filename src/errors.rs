//! Error rendering shared by the `repd` and `repctl` binaries.

use std::error::Error;

/// An error and its causes on one line (`outer: cause: root`), skipping a
/// cause whose text the line already spells out (many errors repeat their
/// source in their own message).
pub fn render_chain(e: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("load failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn joins_causes_and_skips_repeated_ones() {
        let e = Outer("meta", std::io::Error::other("disk on fire"));
        assert_eq!(render_chain(&e), "cannot open meta: disk on fire");
        // The source's text is already in the message: not repeated.
        let e = Repeats(std::io::Error::other("disk on fire"));
        assert_eq!(render_chain(&e), "load failed: disk on fire");
    }
}
