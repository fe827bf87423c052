//! Hostile input, each answered the safe way.

mod forged_events;
mod framing;
mod fuzz_corpus;
mod inputs;
mod request_ids;
