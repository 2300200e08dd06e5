//! A discard-everything upstream: speaks just enough of the server side of
//! AMQP 0-9-1 for the proxy to connect (Start, Tune, OpenOk), answers
//! Channel.Open, Basic.Qos (the proxy's reuse fence), Confirm.Select and
//! the closes, and counts and discards every publish. With it, the proxy is
//! the only thing between a publisher and the bytes' end.

use crate::amqp::{self, FrameRef};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

#[derive(Default)]
pub struct Counters {
    /// Basic.Publish methods received.
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    pub connections: AtomicU64,
}

pub struct Sink {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Sink {
    pub fn start() -> io::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::Builder::new()
            .name("sink-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    let c = c.clone();
                    let _ = thread::Builder::new()
                        .name("sink-conn".into())
                        .spawn(move || {
                            let _ = serve(stream, &c);
                        });
                }
            })?;
        Ok(Sink {
            addr,
            counters,
            stop,
        })
    }
}

fn serve(mut s: TcpStream, counters: &Counters) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut header = [0u8; 8];
    s.read_exact(&mut header)?;
    s.write_all(&amqp::connection_start())?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut head, mut tail) = (0usize, 0usize);
    let mut reply = Vec::new();
    loop {
        if head > 0 {
            buf.copy_within(head..tail, 0);
            tail -= head;
            head = 0;
        }
        if tail == buf.len() {
            let n = buf.len();
            buf.resize(n * 2, 0);
        }
        let n = s.read(&mut buf[tail..])?;
        if n == 0 {
            return Ok(());
        }
        tail += n;
        let mut published = 0u64;
        let mut closed = false;
        while let Some((frame, used)) = amqp::parse(&buf[head..tail])? {
            head += used;
            if frame.frame_type != amqp::FRAME_METHOD {
                continue;
            }
            if frame.method_id() == Some(amqp::BASIC_PUBLISH) {
                published += 1;
            } else {
                closed |= answer(frame, &mut reply);
            }
        }
        counters.messages.fetch_add(published, Ordering::Relaxed);
        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if !reply.is_empty() {
            s.write_all(&reply)?;
            reply.clear();
        }
        if closed {
            return Ok(());
        }
    }
}

/// Appends the answer to a method; true when the connection is done.
fn answer(frame: FrameRef<'_>, reply: &mut Vec<u8>) -> bool {
    let ch = frame.channel;
    match frame.method_id() {
        Some(amqp::CONNECTION_START_OK) => reply.extend_from_slice(&amqp::tune(2047, 131072, 0)),
        Some(amqp::CONNECTION_OPEN) => reply.extend_from_slice(&amqp::open_ok()),
        Some(amqp::CHANNEL_OPEN) => reply.extend_from_slice(&amqp::channel_open_ok(ch)),
        Some(amqp::BASIC_QOS) => reply.extend_from_slice(&amqp::simple(ch, amqp::BASIC_QOS_OK)),
        Some(amqp::CONFIRM_SELECT) => {
            reply.extend_from_slice(&amqp::simple(ch, amqp::CONFIRM_SELECT_OK))
        }
        Some(amqp::CHANNEL_CLOSE) => {
            reply.extend_from_slice(&amqp::simple(ch, amqp::CHANNEL_CLOSE_OK))
        }
        Some(amqp::CONNECTION_CLOSE) => {
            reply.extend_from_slice(&amqp::simple(0, amqp::CONNECTION_CLOSE_OK));
            return true;
        }
        _ => {}
    }
    false
}
