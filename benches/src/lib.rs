//! Load harness (see README).

pub mod scenario;
