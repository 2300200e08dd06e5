//! Socket set-up: listeners with a configurable backlog (socket2), and the
//! options every connection gets.

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

/// Binds every address `host` resolves to (so `localhost` serves both
/// 127.0.0.1 and ::1); fails only if none can be bound.
pub fn bind_listeners(
    host: &str,
    port: u16,
    backlog: u32,
) -> io::Result<Vec<mio::net::TcpListener>> {
    let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs.sort();
    addrs.dedup();
    let mut listeners = Vec::new();
    let mut last_error = None;
    for addr in addrs {
        match bind(addr, backlog) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                log::debug!("cannot listen on {addr}: {e}");
                last_error = Some(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr}: {e}"),
                ));
            }
        }
    }
    if listeners.is_empty() {
        return Err(last_error
            .unwrap_or_else(|| io::Error::other(format!("{host} resolves to no address"))));
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr, backlog: u32) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// Small frames (acks, publishes) must not wait for Nagle.
pub fn tune_stream(stream: &mio::net::TcpStream, keepalive: bool) {
    let _ = stream.set_nodelay(true);
    if keepalive {
        let _ = SockRef::from(stream).set_keepalive(true);
    }
}
