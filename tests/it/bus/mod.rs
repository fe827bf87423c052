//! The bus backends.

mod contract;
mod listeners;
