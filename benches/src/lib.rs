//! Load harness (see README).
