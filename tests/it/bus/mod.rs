//! The bus backends.

mod contract;
