//! End-to-end tests: the real `remora` binary between in-process clients and origins (see `harness`).

mod admin;
mod aggregate;
mod balancing;
mod corpus;
mod dns;
mod fuzz_replay;
mod grpc;
mod harness;
mod harness_selftest;
mod headers;
mod health_check;
mod kubernetes;
mod lifecycle;
mod load_shedding;
mod local_replies;
mod observability;
mod passthrough;
mod protocols;
mod retry_budget;
mod routing;
mod support;
mod templates;
mod timeouts;
mod tls;
mod xds;
mod zone_routing;
