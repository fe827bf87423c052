//! What a soak run records, one JSON object a line, and the files it goes to.
//!
//! Every time is Unix milliseconds from the wall clock, the clock corral's own log lines use, so
//! the harness's records and the replicas' lease lines share one timeline.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Upstream fetches, as the origin received them.
pub const FETCHES: &str = "fetches.jsonl";
/// Client answers, one per request the load sent.
pub const ANSWERS: &str = "answers.jsonl";
/// Faults injected and healed.
pub const FAULTS: &str = "faults.jsonl";
/// Leases won and commits accepted, taken from the replicas' logs.
pub const LEASES: &str = "leases.jsonl";
/// The checker's summary.
pub const SUMMARY: &str = "summary.json";

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One upstream fetch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fetch {
    /// When the request reached the origin (Unix ms).
    pub at_ms: u64,
    pub key: String,
    /// 1 for the first fetch of this key in the run.
    pub fetch: u64,
    /// Which replica slot fetched (each slot reaches the origin on its own port).
    pub replica: usize,
    /// How long the origin waits before answering (ms).
    pub latency_ms: u64,
    /// Length of the body sent (bytes).
    pub len: usize,
}

/// How a body compared with what the origin sends for its key and fetch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BodyCheck {
    /// Belongs to the requested key, complete, checksum right.
    Good,
    /// A complete body of another key.
    WrongKey,
    /// The right key's header, but a length or checksum that does not match: cut or corrupted.
    Partial,
    /// Not a body the origin sends at all.
    Unparsable,
    /// Not a 200: nothing to compare.
    NotChecked,
}

/// One client request and how it ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub start_ms: u64,
    pub end_ms: u64,
    pub key: String,
    pub replica: usize,
    /// HTTP status; `None` when the exchange failed (see `error`).
    pub status: Option<u16>,
    pub x_cache: Option<String>,
    pub body: BodyCheck,
    /// The fetch number the body says it came from.
    pub fetch: Option<u64>,
    /// The longest corral may take to answer (its `wait_timeout`), ms.
    pub deadline_ms: u64,
    /// Transport error or client-side timeout.
    pub error: Option<String>,
}

/// What a fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Kill,
    Restart,
    Pause,
    Resume,
}

/// One fault step: a target killed or paused, or healed again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fault {
    pub at_ms: u64,
    pub action: Action,
    /// `replica-N`, `redis` or `nats`.
    pub target: String,
    /// The process signalled (for a restart: the new one).
    pub pid: u32,
}

/// A lease event one replica logged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseStep {
    Acquired,
    Committed,
}

/// One `corral::lease` log line of a replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub at_ms: u64,
    pub step: LeaseStep,
    /// The soak key whose digest the line names; `None` when no soak key has that digest.
    pub key: Option<String>,
    pub digest: String,
    pub token: String,
    pub replica: usize,
    /// 1 for a replica's first process, 2 after its first restart, ...
    pub incarnation: u32,
}

/// A JSON-lines file written from many tasks.
pub struct Journal {
    out: Mutex<BufWriter<File>>,
}

impl Journal {
    pub fn create(path: &Path) -> Journal {
        let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Journal {
            out: Mutex::new(BufWriter::new(file)),
        }
    }

    pub fn write<T: Serialize>(&self, record: &T) {
        let line = serde_json::to_string(record).expect("records serialise");
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(out, "{line}").expect("write a journal line");
    }

    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().expect("flush a journal");
    }
}

/// Every record of a JSON-lines file (an absent file has none).
pub fn read<T: DeserializeOwned>(path: &Path) -> Vec<T> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map(|line| line.unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: bad line {line:?}: {e}", path.display()))
        })
        .collect()
}
