//! End-to-end tests: the real `remora` binary between in-process clients and origins (see `harness`).

mod corpus;
mod fuzz_replay;
mod harness;
mod harness_selftest;
