//! AMQProxy: an AMQP 0-9-1 proxy that pools upstream connections and
//! channels. The protocol core (`protocol`, `core`) is sans-IO; `server`
//! is the mio/thread shell around it.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod core;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod server;
