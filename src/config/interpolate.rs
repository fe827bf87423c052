//! `${VAR}` and `${VAR:-default}` in config values.
//!
//! Expansion runs on each scalar value after the YAML is parsed, never on the raw text: a variable
//! cannot inject YAML structure (a value with a newline or a `: ` stays one string), and every
//! position in the file stays where the author wrote it. Keys are never expanded.
//!
//! - `${NAME}`: the variable's value; an unset variable is an error (set but empty is fine).
//! - `${NAME:-default}`: the value, or `default` when the variable is unset or empty.
//! - `$${` writes a literal `${`; any other `$` is left alone (so regexes keep their anchors).
//!
//! Names are `[A-Za-z_][A-Za-z0-9_]*`; a default runs to the first `}` and is taken literally.

/// Why a value could not be expanded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    #[error("environment variable {0} is not set (write ${{{0}:-default}} to give a default)")]
    Unset(String),
    #[error("invalid variable name {0:?} in ${{...}}")]
    BadName(String),
    #[error("unterminated ${{ (no closing }})")]
    Unterminated,
}

/// Expands every `${...}` in `text`, looking variables up with `env`.
pub fn expand(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or(InterpolateError::Unterminated)?;
            out.push_str(&substitute(&after[..end], env)?);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of one `${...}` body: `NAME` or `NAME:-default`.
fn substitute(
    body: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    let (name, default) = match body.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (body, None),
    };
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(InterpolateError::BadName(name.to_string()));
    }
    match (env(name), default) {
        (Some(value), Some(default)) if value.is_empty() => Ok(default.to_string()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_string()),
        (None, None) => Err(InterpolateError::Unset(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_expand_inside_values() {
        assert_eq!(expand("Bearer ${TOKEN}!", &env).unwrap(), "Bearer s3cret!");
        assert_eq!(expand("${TOKEN}${TOKEN}", &env).unwrap(), "s3crets3cret");
        assert_eq!(expand("${EMPTY}", &env).unwrap(), "");
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        assert_eq!(expand("${NOPE:-x:y}", &env).unwrap(), "x:y");
        assert_eq!(expand("${EMPTY:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand("${TOKEN:-fallback}", &env).unwrap(), "s3cret");
        assert_eq!(expand("${NOPE:-}", &env).unwrap(), "");
    }

    #[test]
    fn dollars_that_are_not_variables_stay() {
        assert_eq!(expand("^/a$", &env).unwrap(), "^/a$");
        assert_eq!(expand("$$5 $", &env).unwrap(), "$$5 $");
        assert_eq!(expand("$${TOKEN}", &env).unwrap(), "${TOKEN}");
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            expand("${NOPE}", &env),
            Err(InterpolateError::Unset("NOPE".into()))
        );
        assert_eq!(
            expand("${1X}", &env),
            Err(InterpolateError::BadName("1X".into()))
        );
        assert_eq!(expand("${TOKEN", &env), Err(InterpolateError::Unterminated));
    }
}
