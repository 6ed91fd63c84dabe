//! End-to-end tests: the real `remora` binary between in-process clients and origins (see `harness`).

mod grpc;
mod harness;
mod harness_selftest;
mod headers;
mod local_replies;
mod protocols;
mod routing;
mod support;
