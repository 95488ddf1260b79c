//! Integration tests of the shop's services: real servers on loopback ports, embedded
//! stores and bus in temporary directories.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod analytics;
mod api;
mod crash;
mod faults;
mod grpc_codegen;
mod inventory;
mod lab;
mod notification;
mod patterns;
mod payment;
mod postgres;
mod serve;
mod shipping;
mod support;
mod up;
