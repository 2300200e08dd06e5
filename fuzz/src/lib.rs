//! Shared code of the fuzz targets: the `session` driver (a scripted
//! client and a scripted broker around one `amqproxy::core::Shard`) and
//! the `Script` builder the seed generator (`examples/make_seeds.rs`) uses
//! to write inputs in the driver's format.

pub mod session;
