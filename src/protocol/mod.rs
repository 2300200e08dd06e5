//! The AMQP 0-9-1 codec: no sockets, no clocks, no threads.
//!
//! `frame` splits a byte stream into borrowed frame views, `codec` reads and
//! writes the primitive types, `table` handles field tables, and `methods`
//! decodes the handful of methods the proxy reasons about and encodes the
//! frames it generates itself. Everything else is forwarded untouched.

pub mod codec;
pub mod constants;
pub mod frame;
pub mod methods;
pub mod spec;
pub mod table;

pub use frame::{Frame, FrameError, FrameStatus};
