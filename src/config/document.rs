//! From YAML text to [`schema::File`], keeping every value's place in the file.
//!
//! `marked-yaml` parses into a tree whose every node knows its line and column. Before serde sees
//! the tree, [`prepare`] walks it once to expand `${VAR}` in each scalar value (positions stay
//! put: the file text is never rewritten), to turn `~`/`null` into the empty value (which means
//! "the default"), and to make the places point where a reader looks: a mapping at its first key,
//! an empty value at its key. Serde then reads the tree into [`schema::File`] with `Spanned`
//! values, and a serde error is placed by walking its field path through the same tree.

use marked_yaml::types::{MarkedScalarNode, Node};
use marked_yaml::{LoadError, LoaderOptions, Span, Spanned};

use super::interpolate;
use super::schema::File;
use super::{Place, Problems};

/// Reads `text` into the file schema; `None` when it is not YAML (the reason is in `problems`).
///
/// Serde stops at the first field of the wrong shape; to report every one, each is removed from
/// the tree once reported and serde runs again on the rest. A file read that way is only good for
/// finding more problems (and `problems` says so, as it is not empty).
pub fn read(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<Spanned<File>> {
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        // Quoted scalars stay strings: `"~"` is a tilde, not "the default".
        .prevent_coercion(true);
    let mut root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        Err(e) => {
            let (place, message) = load_problem(&e);
            problems.add(place, "", message);
            return None;
        }
    };
    prepare(&mut root, &mut String::new(), env, problems);
    // Each round removes one entry, so this ends; the bound only caps the noise.
    for _ in 0..100 {
        let e = match marked_yaml::from_node::<Spanned<File>>(&root) {
            Ok(file) => return Some(file),
            Err(e) => e,
        };
        let mut path = e.path().unwrap_or_default().to_string();
        let (place, message) = match &*e {
            marked_yaml::Error::UnknownFieldError(field, expected, _) => {
                let place = key_place(&root, &path, field);
                // Derived structs name the unknown key in the path; hand-written visitors do not.
                let named = path == *field || path.ends_with(&format!(".{field}"));
                if !named {
                    path = match path.as_str() {
                        "" => field.clone(),
                        parent => format!("{parent}.{field}"),
                    };
                }
                let expected = expected.join(", ");
                (
                    place,
                    format!("unknown field (expected one of: {expected})"),
                )
            }
            other => (value_place(&root, &path), other.to_string()),
        };
        problems.add(place, &path, message);
        if !remove_entry(&mut root, &steps(&path)) {
            return None;
        }
    }
    None
}

fn load_problem(e: &LoadError) -> (Place, String) {
    match e {
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => (
            Place::of_marker(m),
            "the file must be a mapping of settings".into(),
        ),
        LoadError::UnexpectedAnchor(m) => (
            Place::of_marker(m),
            "yaml anchors and aliases are not supported".into(),
        ),
        LoadError::MappingKeyMustBeScalar(m) => {
            (Place::of_marker(m), "a key must be a plain string".into())
        }
        LoadError::UnexpectedTag(m) => (Place::of_marker(m), "yaml tags are not supported".into()),
        LoadError::ScanError(m, scan) => (
            Place::of_marker(m),
            format!("invalid yaml: {}", scan.info()),
        ),
        LoadError::DuplicateKey(dup) => {
            let first = Place::of_span(dup.prev_key.span());
            (
                Place::of_span(dup.key.span()),
                format!(
                    "duplicate key {:?} (first on line {})",
                    dup.key.as_str(),
                    first.line
                ),
            )
        }
    }
}

// ----- the walk before serde

/// Expands variables, empties nulls and moves places, in every value below `node`; `path` names
/// `node` in messages (`routes[1].match`).
fn prepare(
    node: &mut Node,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) {
    match node {
        Node::Scalar(scalar) => {
            if let Some(value) = expand_scalar(scalar, path, env, problems) {
                *node = Node::Scalar(value);
            }
        }
        Node::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                prepare(item, path, env, problems);
                path.truncate(len);
            }
        }
        Node::Mapping(map) => {
            let first_key = map.keys().next().map(|k| *k.span());
            for (key, value) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key.as_str());
                prepare(value, path, env, problems);
                if let Node::Scalar(s) = value
                    && s.may_coerce()
                    && s.is_empty()
                {
                    *value.span_mut() = *key.span();
                }
                path.truncate(len);
            }
            if let Some(first) = first_key.as_ref().and_then(Span::start)
                && let Some(start) = map.span_mut().start_mut()
            {
                *start = *first;
            }
        }
    }
}

/// The scalar to put in place of `scalar`, if it changes.
fn expand_scalar(
    scalar: &MarkedScalarNode,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<MarkedScalarNode> {
    let plain = scalar.may_coerce();
    let text = scalar.as_str();
    if plain && matches!(text, "~" | "null" | "Null" | "NULL") {
        return Some(MarkedScalarNode::new_empty(*scalar.span()));
    }
    if !text.contains("${") {
        return None;
    }
    match interpolate::expand(text, env) {
        Ok(expanded) => {
            let mut value = MarkedScalarNode::new(*scalar.span(), expanded);
            value.set_coerce(plain);
            Some(value)
        }
        Err(e) => {
            problems.add(Place::of_span(scalar.span()), path, e);
            None
        }
    }
}

// ----- placing serde errors

/// One step of a serde error path as `marked-yaml` renders it (`routes[1].match.path`).
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            steps.push(Step::Key(key));
        }
        for index in indices.split(['[', ']']).filter(|i| !i.is_empty()) {
            match index.parse() {
                Ok(i) => steps.push(Step::Index(i)),
                Err(_) => steps.push(Step::Key(index)),
            }
        }
    }
    steps
}

fn child<'n>(node: &'n Node, step: &Step<'_>) -> Option<&'n Node> {
    match (step, node) {
        (Step::Key(k), Node::Mapping(m)) => m.get_node(k),
        (Step::Index(i), Node::Sequence(s)) => s.get_node(*i),
        _ => None,
    }
}

fn child_mut<'n>(node: &'n mut Node, step: &Step<'_>) -> Option<&'n mut Node> {
    match (step, node) {
        (Step::Key(k), Node::Mapping(m)) => m.get_mut(*k),
        (Step::Index(i), Node::Sequence(s)) => s.get_mut(*i),
        _ => None,
    }
}

/// The deepest node along `path`, and the one above it.
fn walk<'n>(root: &'n Node, path: &str) -> (&'n Node, &'n Node) {
    let (mut parent, mut node) = (root, root);
    for step in steps(path) {
        match child(node, &step) {
            Some(next) => (parent, node) = (node, next),
            None => break,
        }
    }
    (parent, node)
}

/// Removes the `key: value` entry that holds what `steps` lead to (the last key along them that
/// exists), so that serde can go on past it; `false` when there is none.
fn remove_entry(root: &mut Node, steps: &[Step<'_>]) -> bool {
    let mut node = &*root;
    let mut resolved = 0;
    for step in steps {
        match child(node, step) {
            Some(next) => (node, resolved) = (next, resolved + 1),
            None => break,
        }
    }
    let Some(last_key) = steps[..resolved]
        .iter()
        .rposition(|s| matches!(s, Step::Key(_)))
    else {
        return false;
    };
    let mut node = root;
    for step in &steps[..last_key] {
        match child_mut(node, step) {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (node, &steps[last_key]) {
        (Node::Mapping(m), Step::Key(k)) => m.remove(*k).is_some(),
        _ => false,
    }
}

/// Where the value at `path` sits.
fn value_place(root: &Node, path: &str) -> Place {
    Place::of_span(walk(root, path).1.span())
}

/// Where the unknown key `field` sits (its mapping is at or just above `path`).
fn key_place(root: &Node, path: &str, field: &str) -> Place {
    let (parent, node) = walk(root, path);
    [node, parent]
        .into_iter()
        .filter_map(Node::as_mapping)
        .find_map(|m| m.keys().find(|k| k.as_str() == field))
        .map(|k| Place::of_span(k.span()))
        .unwrap_or_else(|| Place::of_span(node.span()))
}

impl Place {
    pub fn of_marker(m: &marked_yaml::Marker) -> Place {
        Place {
            line: m.line(),
            column: m.column(),
        }
    }

    pub fn of_span(span: &Span) -> Place {
        span.start().map(Place::of_marker).unwrap_or_default()
    }

    pub fn of<T>(value: &Spanned<T>) -> Place {
        Place::of_span(value.span())
    }
}
