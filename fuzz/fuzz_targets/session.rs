//! The client-session state machine: one `Shard` with a scripted broker,
//! a client that completed a valid handshake, then the fuzz input as a
//! program of client bytes, broker answers and events, clock ticks and
//! reads. The input format and every invariant checked are described in
//! `fuzz/src/session.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    amqproxy_fuzz::session::run(data);
});
