//! What a build returns, and what a caller gets: the typed outcomes the engine hands back, so that
//! nothing about an answer travels outside them.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::flight::Source;
use crate::envelope::Entry;
use crate::store::StoreError;

/// What a build produced.
#[derive(Debug)]
pub enum Built {
    /// May be stored and served to everyone for `entry.ttl` (plus `entry.stale`).
    Shared(Entry),
    /// Private to the caller whose build produced it; never stored, never handed to anyone else.
    Private(Private),
    /// The stored entry a [`BuildRole::Revalidate`] build was handed is still current (the
    /// proxy's upstream answered `304 Not Modified`): `entry` is that entry with the headers and
    /// freshness the confirmation updated, and the stored body. Stored and served like
    /// [`Built::Shared`]; a store that can rewrite a value's head in place keeps the body without
    /// it crossing the network again ([`crate::store::Store::commit_revalidated`]).
    Revalidated(Entry),
}

/// An answer that may not be shared, and why.
#[derive(Debug)]
pub struct Private {
    pub entry: Entry,
    /// Why it may not be shared: a short lowercase word (the proxy's `Cache-Status` detail, such
    /// as `set-cookie` or `vary`).
    pub reason: &'static str,
    /// What the entry could not hold, for the caller whose build made it and nobody else (the
    /// proxy's answer too large to buffer, still streaming from the upstream).
    pub attachment: Option<Attachment>,
}

impl Private {
    /// A private answer for `reason`, with nothing attached.
    pub fn new(entry: Entry, reason: &'static str) -> Self {
        Self {
            entry,
            reason,
            attachment: None,
        }
    }
}

/// A value of the builder's own type riding with a [`Private`] answer to the one caller whose
/// build made it. The engine never looks inside; the caller takes it back with
/// [`Attachment::take`].
pub struct Attachment(Box<dyn Any + Send + Sync>);

impl Attachment {
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Self(Box::new(value))
    }

    /// The value, if it is a `T`.
    pub fn take<T: Any>(self) -> Option<T> {
        self.0.downcast().ok().map(|value| *value)
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attachment")
    }
}

/// A build that failed; its message (and error response, if it has one) reaches every caller
/// that waited for it, at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BuildError {
    pub message: String,
    /// What the source answered (the proxy's upstream 5xx), given to every waiter as it is.
    pub response: Option<Entry>,
}

impl BuildError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            response: None,
        }
    }

    pub fn with_response(message: impl Into<String>, response: Entry) -> Self {
        Self {
            message: message.into(),
            response: Some(response),
        }
    }
}

/// A failed build as its callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: Arc<str>,
    /// The error response, when the build had one (on other processes: when it was small enough
    /// to ride in the event).
    pub response: Option<Arc<Entry>>,
    pub cause: FailureCause,
}

/// Why a build failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// The build answered an error.
    Build,
    /// The build ran past `max_fetch` and was abandoned: its callers get this, while other
    /// processes' waiters re-elect a leader.
    Overran,
    /// The build panicked.
    Panicked,
}

impl Failure {
    pub(crate) fn message(message: impl Into<Arc<str>>) -> Self {
        Self {
            message: message.into(),
            response: None,
            cause: FailureCause::Build,
        }
    }

    pub(crate) fn because(cause: FailureCause, message: impl Into<Arc<str>>) -> Self {
        Self {
            cause,
            ..Self::message(message)
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Self::message(message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The future a builder returns.
pub type BuildFuture = Pin<Box<dyn Future<Output = Result<Built, BuildError>> + Send>>;

/// Makes the value of one key; may be called again if a lease is lost or a build abandoned. Told
/// its [`BuildRole`], so work that only serves a stored value is skipped where nothing is stored.
pub type Builder = Arc<dyn Fn(BuildRole) -> BuildFuture + Send + Sync>;

/// Why a build runs, which says whether what it returns may be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildRole {
    /// Under the key's lease: a shared answer is stored and served to everyone.
    Leader,
    /// Under the key's lease, refreshing this stored entry, which has gone stale (or was stored
    /// to be revalidated on every use). A builder that can ask its source whether the entry is
    /// still current (the proxy's conditional request with the entry's `ETag` and
    /// `Last-Modified`) answers [`Built::Revalidated`] when it is; any other answer replaces the
    /// entry as a leader's would. A builder that cannot ask simply builds anew.
    Revalidate(Arc<Entry>),
    /// The caller's own build, for a key that may not be shared (uncacheable, or a hit-for-pass
    /// marker): nothing is stored.
    Own,
    /// A build while the store cannot be reached: its answer serves this process's callers (and
    /// its L1) only.
    Degraded,
}

impl BuildRole {
    /// Whether what the build returns may reach the store, so that work that only serves a
    /// stored value (indexing it for purges) is worth doing.
    pub fn stores(&self) -> bool {
        matches!(self, BuildRole::Leader | BuildRole::Revalidate(_))
    }

    /// The stored entry this build revalidates, if it does.
    pub fn revalidating(&self) -> Option<&Arc<Entry>> {
        match self {
            BuildRole::Revalidate(entry) => Some(entry),
            _ => None,
        }
    }
}

/// What a caller gets.
#[derive(Debug)]
pub struct Answer {
    pub entry: Arc<Entry>,
    pub source: AnswerSource,
    /// What the caller's own private build attached to its answer ([`Private::attachment`]).
    pub attachment: Option<Attachment>,
}

impl Answer {
    pub(crate) fn shared(entry: Arc<Entry>, source: Source) -> Self {
        Self {
            entry,
            source: AnswerSource::Shared(source),
            attachment: None,
        }
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    /// A shared value.
    Shared(Source),
    /// The caller's own build, because the key may not be shared (uncacheable or hit-for-pass);
    /// `reason` is its build's, when it said why.
    Own { reason: Option<&'static str> },
}

/// Why a caller got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("timed out after {0:?} waiting for the value")]
    Timeout(Duration),
    #[error("{0}")]
    Build(Failure),
    #[error("nothing is stored under this key")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the engine is closed")]
    Closed,
    /// The key's flight already has `max_followers` waiting; `stale` is a stored copy past its
    /// freshness that the flight found, if any, for the caller to serve instead.
    #[error("too many requests are waiting for this key")]
    TooManyFollowers { stale: Option<Arc<Entry>> },
}
