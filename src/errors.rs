//! Error text shared by every side.

/// An error and its causes on one line: a client library's own message alone says little.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    // Bounded: error chains are short, but a cyclic one must not loop forever.
    for _ in 0..8 {
        let Some(next) = cause else { break };
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
