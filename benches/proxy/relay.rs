//! The delay relay: a TCP forwarder that holds every chunk of bytes for a
//! fixed one-way delay in each direction, preserving order, so a loopback
//! broker looks like one `2 × delay` of RTT away.
//!
//! A TCP connect over such a link would itself take one RTT before the
//! client could send anything; the relay accepts at once (in the kernel), so
//! it emulates that round trip by holding the client's first bytes an extra
//! `2 × delay`. A client then sees the broker's Connection.Start after
//! 2 RTT, as it would over the real link.
//!
//! Four threads per relayed connection (a reader and a writer each way): few
//! connections, simple code, and sleeping writers cost no CPU.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub struct Relay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(target: SocketAddr, delay: Duration) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = stream else { continue };
                    let accepted_at = Instant::now();
                    thread::spawn(move || {
                        if let Err(e) = relay(client, target, delay, accepted_at) {
                            eprintln!("relay: {e}");
                        }
                    });
                }
            })?;
        Ok(Relay { addr, stop })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn relay(
    client: TcpStream,
    target: SocketAddr,
    delay: Duration,
    accepted_at: Instant,
) -> io::Result<()> {
    let server = match TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let connect_rtt_done = accepted_at + delay * 2;
    pipe(
        client.try_clone()?,
        server.try_clone()?,
        delay,
        connect_rtt_done,
    )?;
    pipe(server, client, delay, accepted_at)?;
    Ok(())
}

/// Bytes read from `from` are written to `to` `delay` after they arrived
/// (and not before `not_before + delay`). End of stream is passed on as a
/// write shutdown, after the same delay.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    not_before: Instant,
) -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::Builder::new()
        .name("relay-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = from.read(&mut buf).unwrap_or(0);
                let due = Instant::now().max(not_before) + delay;
                if tx.send((due, buf[..n].to_vec())).is_err() || n == 0 {
                    return;
                }
            }
        })?;
    thread::Builder::new()
        .name("relay-write".into())
        .spawn(move || {
            while let Ok((due, bytes)) = rx.recv() {
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                if bytes.is_empty() {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                if to.write_all(&bytes).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        })?;
    Ok(())
}
