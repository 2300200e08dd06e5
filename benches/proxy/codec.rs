//! Scenario 4, micro-benchmarks of the library: the frame reader with the
//! channel rewrite, and publish assembly through the sans-IO core (a
//! `Shard` driven by a scripted client and a scripted broker, no sockets).

use crate::amqp;
use crate::report::{f, Json, Table};
use crate::{Ctx, TargetCheck};
use amqproxy::core::{Action, ConnRef, Settings, Shard};
use amqproxy::protocol::frame::{parse_frame, put_frame, set_channel};
use amqproxy::protocol::FrameStatus;
use std::hint::black_box;
use std::io;
use std::time::{Duration, Instant};

/// Runs `pass` (which handles `items` items) until `min` has elapsed;
/// returns ns per item.
fn time_per_item(min: Duration, items: u64, mut pass: impl FnMut()) -> f64 {
    pass(); // warm caches
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < min {
        pass();
        done += items;
    }
    start.elapsed().as_nanos() as f64 / done as f64
}

fn publishes(count: usize, size: usize, channel: u16) -> Vec<u8> {
    amqp::publish(channel, "", "bench", &vec![b'x'; size]).repeat(count)
}

fn parse_and_rewrite(min: Duration) -> (f64, f64) {
    let mut stream = publishes(1000, 16, 1);
    let frames = 3000u64;
    let in_place = time_per_item(min, frames, || {
        let mut pos = 0;
        while pos < stream.len() {
            let (used, ch) = match parse_frame(&stream[pos..], 131072) {
                Ok(FrameStatus::Complete(fr, used)) => (used, fr.channel),
                _ => panic!("bad fixture"),
            };
            set_channel(&mut stream[pos..pos + used], black_box(ch ^ 1));
            pos += used;
        }
        black_box(&stream);
    });
    let mut out = Vec::with_capacity(stream.len());
    let copying = time_per_item(min, frames, || {
        out.clear();
        let mut rest = &stream[..];
        while let Ok(FrameStatus::Complete(fr, used)) = parse_frame(rest, 131072) {
            put_frame(&mut out, fr.frame_type, black_box(7), fr.payload);
            rest = &rest[used..];
        }
        black_box(&out);
    });
    (in_place, copying)
}

/// A shard with one client that has channel 1 open on an upstream
/// connection to a scripted broker.
fn connected_shard() -> io::Result<(
    Shard,
    amqproxy::core::ClientId,
    amqproxy::core::UpstreamId,
    Instant,
)> {
    let now = Instant::now();
    let mut shard = Shard::new(Settings::default(), now);
    let c = shard.client_connected("127.0.0.1:1".into(), now);
    let drain = |shard: &mut Shard, conn: ConnRef| -> Vec<u8> {
        let out = shard.output(conn).to_vec();
        shard.output_written(conn, out.len());
        out
    };
    shard.client_data(c, amqp::PROTOCOL_HEADER, now);
    drain(&mut shard, ConnRef::Client(c));
    shard.client_data(c, &amqp::start_ok("guest", "guest", "codec bench"), now);
    drain(&mut shard, ConnRef::Client(c));
    let mut b = amqp::tune_ok(2047, 131072, 0);
    b.extend_from_slice(&amqp::connection_open("/"));
    shard.client_data(c, &b, now);
    let up = shard
        .take_actions()
        .find_map(|a| match a {
            Action::Connect(id) => Some(id),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("the shard asked for no upstream connection"))?;
    shard.upstream_connected(up, now);
    drain(&mut shard, ConnRef::Upstream(up));
    shard.upstream_data(up, &amqp::connection_start(), now);
    drain(&mut shard, ConnRef::Upstream(up));
    shard.upstream_data(up, &amqp::tune(2047, 131072, 60), now);
    drain(&mut shard, ConnRef::Upstream(up));
    shard.upstream_data(up, &amqp::open_ok(), now);
    let got = drain(&mut shard, ConnRef::Client(c));
    let frame_is = |bytes: &[u8], id| matches!(amqp::parse(bytes), Ok(Some((fr, _))) if fr.method_id() == Some(id));
    if !frame_is(&got, amqp::CONNECTION_OPEN_OK) {
        return Err(io::Error::other("scripted handshake: no Connection.OpenOk"));
    }
    shard.client_data(c, &amqp::channel_open(1), now);
    let sent = drain(&mut shard, ConnRef::Upstream(up));
    let n = match amqp::parse(&sent) {
        Ok(Some((fr, _))) if fr.method_id() == Some(amqp::CHANNEL_OPEN) => fr.channel,
        _ => {
            return Err(io::Error::other(
                "scripted handshake: no Channel.Open upstream",
            ))
        }
    };
    shard.upstream_data(up, &amqp::channel_open_ok(n), now);
    if !frame_is(
        &drain(&mut shard, ConnRef::Client(c)),
        amqp::CHANNEL_OPEN_OK,
    ) {
        return Err(io::Error::other("scripted handshake: no Channel.OpenOk"));
    }
    Ok((shard, c, up, now))
}

/// ns per publish (method + header + body) fed to the shard in 64 KiB reads
/// (the worker's scratch size), with the upstream output drained after each
/// read as the worker's write would.
fn shard_publish(min: Duration, size: usize) -> io::Result<(f64, f64)> {
    let (mut shard, c, up, now) = connected_shard()?;
    let per_msg = amqp::publish(1, "", "bench", &vec![b'x'; size]).len();
    let count = (4 << 20) / per_msg;
    let stream = publishes(count, size, 1);
    let mut forwarded = 0usize;
    let ns = time_per_item(min, count as u64, || {
        for chunk in stream.chunks(64 * 1024) {
            shard.client_data(c, chunk, now);
            let n = shard.output(ConnRef::Upstream(up)).len();
            forwarded += n;
            shard.output_written(ConnRef::Upstream(up), n);
        }
    });
    // Every publish must have come out (same length: only the channel
    // number changes), or the figure would be for dropping frames.
    let passes = forwarded / stream.len();
    if forwarded != passes * stream.len() || passes == 0 {
        return Err(io::Error::other(format!(
            "shard forwarded {forwarded} bytes, not a multiple of the {} fed",
            stream.len()
        )));
    }
    Ok((ns, per_msg as f64))
}

/// Basic.Consume (nowait) of queue `bench` with consumer tag `tag`.
fn consume(out: &mut Vec<u8>, tag: &[u8]) {
    let mut args = vec![0, 0]; // ticket
    amqp::shortstr(&mut args, b"bench");
    amqp::shortstr(&mut args, tag);
    args.push(0b1000); // nowait
    args.extend_from_slice(&[0, 0, 0, 0]); // arguments
    amqp::put_method(out, 1, (60, 20), &args);
}

/// Basic.Cancel (nowait) of consumer tag `tag`.
fn cancel(out: &mut Vec<u8>, tag: &[u8]) {
    let mut args = Vec::new();
    amqp::shortstr(&mut args, tag);
    args.push(1); // nowait
    amqp::put_method(out, 1, (60, 30), &args);
}

/// ns per Basic.Consume + Basic.Cancel (nowait) on a channel that already
/// has `active` consumers: the proxy checks each tag against the channel's
/// active ones (RabbitMQ answers a reused tag with a connection error), so
/// this is flat in `active` only if that check is.
fn shard_consume(min: Duration, active: usize) -> io::Result<f64> {
    let (mut shard, c, up, now) = connected_shard()?;
    let mut preload = Vec::new();
    for i in 0..active {
        consume(&mut preload, format!("held-{i}").as_bytes()); // these stay
    }
    for chunk in preload.chunks(64 * 1024) {
        shard.client_data(c, chunk, now);
        let n = shard.output(ConnRef::Upstream(up)).len();
        shard.output_written(ConnRef::Upstream(up), n);
    }
    let count = 2000;
    let mut stream = Vec::new();
    for i in 0..count {
        let tag = format!("cycle-{i}");
        consume(&mut stream, tag.as_bytes());
        cancel(&mut stream, tag.as_bytes());
    }
    let mut forwarded = 0usize;
    let ns = time_per_item(min, count as u64, || {
        shard.client_data(c, &stream, now);
        let n = shard.output(ConnRef::Upstream(up)).len();
        forwarded += n;
        shard.output_written(ConnRef::Upstream(up), n);
    });
    if forwarded == 0 || forwarded % stream.len() != 0 || shard.counts().clients != 1 {
        return Err(io::Error::other(format!(
            "consume bench: {forwarded} bytes forwarded for {} fed, {} clients",
            stream.len(),
            shard.counts().clients
        )));
    }
    Ok(ns)
}

/// ns per frame for dropping a slow consumer's unsent output: 16 MB of
/// small deliveries (method, header, 1-byte body) spread over `channels`
/// channels, the socket having taken the first 10 bytes.
fn drop_unsent(channels: u16) -> f64 {
    use amqproxy::core::outbuf::OutBuf;
    let mut o = OutBuf::new();
    let mut frames = 0u64;
    let mut ch = 0u16;
    while o.len() < 16 << 20 {
        ch = ch % channels + 1;
        let deliver = [0, 60, 0, 60, 1, b'c', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, b'q'];
        put_frame(o.tail(), 1, ch, &deliver);
        put_frame(
            o.tail(),
            2,
            ch,
            &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        );
        put_frame(o.tail(), 3, ch, b"x");
        frames += 3;
    }
    o.consume(10);
    let t = Instant::now();
    let dropped = black_box(o.drop_unsent());
    let ns = t.elapsed().as_nanos() as f64 / frames as f64;
    assert!(dropped > 15 << 20, "dropped only {dropped} bytes");
    ns
}

pub fn scenario(ctx: &mut Ctx) -> io::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("codec: warning: built without optimisations; run through `cargo bench`");
    }
    let min = Duration::from_secs_f64(ctx.opts.codec_seconds);
    eprintln!("codec: micro-benchmarks");
    let (in_place, copying) = parse_and_rewrite(min);
    let (p16, w16) = shard_publish(min, 16)?;
    let (p4k, w4k) = shard_publish(min, 4096)?;
    let drop_1 = drop_unsent(1);
    let drop_many = drop_unsent(u16::MAX);
    let consume_few = shard_consume(min, 10)?;
    let consume_many = shard_consume(min, 20_000)?;
    let mut table = Table::new(
        "codec micro-benchmarks (library, no I/O)",
        &["operation", "ns", "per", "GB/s"],
    );
    let gbs = |ns: f64, bytes: f64| f(bytes / ns, 2);
    table.row(vec![
        "parse_frame + set_channel in place".into(),
        f(in_place, 2),
        "frame".into(),
        "-".into(),
    ]);
    table.row(vec![
        "parse_frame + put_frame (copy, new channel)".into(),
        f(copying, 2),
        "frame".into(),
        "-".into(),
    ]);
    table.row(vec![
        "Shard: publish 16 B (3 frames) client → upstream".into(),
        f(p16, 1),
        "message".into(),
        gbs(p16, w16),
    ]);
    table.row(vec![
        "Shard: publish 4 KiB (3 frames) client → upstream".into(),
        f(p4k, 1),
        "message".into(),
        gbs(p4k, w4k),
    ]);
    table.row(vec![
        "Shard: Consume + Cancel (nowait), 10 consumers active".into(),
        f(consume_few, 1),
        "pair".into(),
        "-".into(),
    ]);
    table.row(vec![
        "Shard: Consume + Cancel (nowait), 20,000 consumers active".into(),
        f(consume_many, 1),
        "pair".into(),
        "-".into(),
    ]);
    table.note(format!(
        "consumer tags: 20,000 active / 10 active = {:.2}x per Consume + Cancel (the duplicate-tag check must not grow with the consumers a channel holds)",
        consume_many / consume_few
    ));
    table.row(vec![
        "OutBuf::drop_unsent, 16 MB of small deliveries on 1 channel".into(),
        f(drop_1, 2),
        "frame".into(),
        "-".into(),
    ]);
    table.row(vec![
        "OutBuf::drop_unsent, the same on 65,535 channels".into(),
        f(drop_many, 2),
        "frame".into(),
        "-".into(),
    ]);
    ctx.targets.push(TargetCheck {
        name: "slow consumer's output dropped, 65,535 vs 1 channel".into(),
        target: "≤ 3× (flat)".into(),
        measured: format!("{:.2}×", drop_many / drop_1),
        met: Some(drop_many / drop_1 <= 3.0),
    });
    ctx.targets.push(TargetCheck {
        name: "consumer-tag check, Consume+Cancel with 20,000 vs 10 active".into(),
        target: "≤ 2× (flat)".into(),
        measured: format!("{:.2}×", consume_many / consume_few),
        met: Some(consume_many / consume_few <= 2.0),
    });
    table.note("publish frames as the load tool sends them (default exchange, routing key `bench`, no properties); the Shard is fed 64 KiB slices, like the worker's reads, so frames straddle slice ends as they do on a socket");
    table.note(format!("a 16 B publish is {w16} bytes on the wire, a 4 KiB one {w4k}; the single-core ceiling this implies for the core alone is {} msgs/s (16 B)", crate::report::rate(1e9 / p16)));
    ctx.tables.push(table);
    ctx.results.push((
        "codec".into(),
        Json::obj(vec![
            ("parse_and_set_channel_ns_per_frame", in_place.into()),
            ("parse_and_copy_ns_per_frame", copying.into()),
            ("shard_publish_16b_ns", p16.into()),
            ("shard_publish_4k_ns", p4k.into()),
            ("drop_unsent_1_channel_ns_per_frame", drop_1.into()),
            ("drop_unsent_65535_channels_ns_per_frame", drop_many.into()),
            ("shard_consume_cancel_10_active_ns", consume_few.into()),
            ("shard_consume_cancel_20000_active_ns", consume_many.into()),
            ("publish_16b_wire_bytes", w16.into()),
            ("publish_4k_wire_bytes", w4k.into()),
        ]),
    ));
    Ok(())
}
