//! Hostile input, each answered the safe way.

mod forged_events;
mod fuzz_corpus;
mod inputs;
