//! A connection's output: whole frames appended at the back, written to
//! the socket from the front.
//!
//! Two things a plain `Vec` does not give: consuming from the front is
//! amortised O(1) (a slow reader's partial writes would otherwise move the
//! whole buffer each time), and the buffer knows where its first whole
//! frame starts, so a slow consumer's unsent frames can be dropped without
//! cutting a frame the socket already started.

/// Compact (move the live bytes to the front) only past this much dead space.
const COMPACT_AT: usize = 64 * 1024;
/// Empty buffers keep at most this much capacity.
const KEEP: usize = 64 * 1024;

/// Buffers grow to the largest burst they carried; give the memory back
/// once they are empty again so idle connections stay small.
pub fn shrink_if_large(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > KEEP {
        *buf = Vec::new();
    }
}

/// Replies a condemned slow consumer's buffer keeps (see
/// [`OutBuf::drop_unsent`]); below the budget's smallest victim, so a dead
/// buffer is never worth another client's disconnection.
pub const KEEP_REPLIES: usize = 16 * 1024;

#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    /// Bytes before it were written.
    head: usize,
    /// Bytes from `head` that finish a frame the socket has partly taken;
    /// whole frames follow.
    partial: usize,
}

impl OutBuf {
    pub fn new() -> Self {
        OutBuf::default()
    }

    /// The bytes not yet written.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory held, for the global buffer budget.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Where to append; only whole frames (or, before any frame, the
    /// protocol header a refused client gets) may be appended.
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// `n` bytes from the front were written.
    pub fn consume(&mut self, n: usize) {
        let len = self.len();
        if n >= len {
            self.buf.clear();
            self.head = 0;
            self.partial = 0;
            shrink_if_large(&mut self.buf);
            return;
        }
        if n <= self.partial {
            self.partial -= n;
        } else {
            // Step over the whole frames the write finished or started.
            let end = self.head + n;
            let mut pos = self.head + self.partial;
            while pos < end {
                match self.buf.get(pos + 3..pos + 7) {
                    Some(size) => {
                        let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]);
                        pos = pos.saturating_add(8).saturating_add(size as usize);
                    }
                    // Not a frame (a protocol header): nothing to keep apart.
                    None => pos = self.buf.len(),
                }
            }
            self.partial = (pos - end).min(len - n);
        }
        self.head += n;
        if self.head >= COMPACT_AT && self.head >= self.buf.len() / 2 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
    }

    /// For a client about to be closed as a slow consumer: drops the
    /// deliveries (Deliver, GetOk, Return with their content) the socket
    /// has not started, and replies past the first [`KEEP_REPLIES`] bytes;
    /// keeps the rest of a delivery already started, so what the client
    /// reads still parses and it sees the replies it waits for (a
    /// ConsumeOk) before the Close. Gives the memory back at once, so the
    /// buffer budget does not count a dead buffer. O(frames): one bit per
    /// channel number. Returns the bytes dropped.
    pub fn drop_unsent(&mut self) -> usize {
        use crate::protocol::constants::{method, FRAME_BODY, FRAME_HEADER, FRAME_METHOD};
        let start = (self.head + self.partial).min(self.buf.len());
        let mut kept = Vec::new();
        // Channels whose current content (a delivery's) is being dropped.
        let mut dropping = vec![0u64; 1024];
        let mut replies = 0usize;
        let mut pos = start;
        while let Some(h) = self.buf.get(pos..pos + 7) {
            let channel = u16::from_be_bytes([h[1], h[2]]) as usize;
            let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
            let Some(end) = pos.checked_add(8 + size).filter(|e| *e <= self.buf.len()) else {
                break;
            };
            let (word, bit) = (channel / 64, 1u64 << (channel % 64));
            let drop = match h[0] {
                FRAME_METHOD => {
                    let id = self.buf.get(pos + 7..pos + 11).map(|b| {
                        (
                            u16::from_be_bytes([b[0], b[1]]),
                            u16::from_be_bytes([b[2], b[3]]),
                        )
                    });
                    let delivery = matches!(
                        id,
                        Some(method::BASIC_DELIVER | method::BASIC_GET_OK | method::BASIC_RETURN)
                    );
                    if delivery {
                        dropping[word] |= bit;
                        true
                    } else {
                        dropping[word] &= !bit;
                        // Replies up to a small bound, in order: a client
                        // that never reads may have asked for megabytes.
                        replies = replies.saturating_add(end - pos);
                        replies > KEEP_REPLIES
                    }
                }
                // Content of a method before `start` (started) is kept.
                FRAME_HEADER | FRAME_BODY => dropping[word] & bit != 0,
                _ => true,
            };
            if !drop {
                kept.extend_from_slice(&self.buf[pos..end]);
            }
            pos = end;
        }
        // Anything after the last whole frame (there is none) stays.
        kept.extend_from_slice(&self.buf[pos..]);
        let dropped = (self.buf.len() - start) - kept.len();
        self.buf.truncate(start);
        self.buf.drain(..self.head);
        self.buf.extend_from_slice(&kept);
        self.head = 0;
        self.buf.shrink_to_fit();
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::constants::method;
    use crate::protocol::frame::{parse_frame, put_frame, FrameStatus};

    fn method_frame(o: &mut OutBuf, channel: u16, id: (u16, u16)) {
        let mut p = id.0.to_be_bytes().to_vec();
        p.extend_from_slice(&id.1.to_be_bytes());
        p.extend_from_slice(&[0; 10]);
        put_frame(o.tail(), 1, channel, &p);
    }

    fn delivery(o: &mut OutBuf, channel: u16, body: usize) {
        method_frame(o, channel, method::BASIC_DELIVER);
        put_frame(
            o.tail(),
            2,
            channel,
            &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100, 0, 0],
        );
        put_frame(o.tail(), 3, channel, &vec![7; body]);
    }

    /// (frame type, channel, first 4 payload bytes) of every whole frame;
    /// panics on trailing bytes.
    fn parse(mut b: &[u8]) -> Vec<(u8, u16, Vec<u8>)> {
        let mut v = Vec::new();
        while let Ok(FrameStatus::Complete(f, used)) = parse_frame(b, 0) {
            v.push((
                f.frame_type,
                f.channel,
                f.payload[..f.payload.len().min(4)].to_vec(),
            ));
            b = &b[used..];
        }
        assert!(b.is_empty(), "{} trailing bytes", b.len());
        v
    }

    fn bodies(n: usize, size: usize) -> OutBuf {
        let mut o = OutBuf::new();
        for i in 0..n {
            put_frame(o.tail(), 3, 1, &vec![i as u8; size]);
        }
        o
    }

    #[test]
    fn consuming_everything_empties_and_frees() {
        let mut o = bodies(100, 4096);
        assert!(o.capacity() > KEEP);
        o.consume(o.len());
        assert!(o.is_empty());
        assert!(o.capacity() <= KEEP);
    }

    #[test]
    fn drops_unstarted_deliveries_and_keeps_replies_and_the_started_one() {
        let mut o = OutBuf::new();
        delivery(&mut o, 1, 1000); // started below
        method_frame(&mut o, 1, (60, 21)); // ConsumeOk of another consumer
        delivery(&mut o, 1, 1000);
        method_frame(&mut o, 2, (20, 11)); // Channel.OpenOk
        delivery(&mut o, 2, 5000);
        delivery(&mut o, 1, 1000);
        let mut written = o.bytes()[..30].to_vec(); // into the first Deliver
        o.consume(30);
        let before = o.len();
        let dropped = o.drop_unsent();
        assert_eq!(before - dropped, o.len());
        written.extend_from_slice(o.bytes());
        let frames = parse(&written);
        let kinds: Vec<_> = frames.iter().map(|f| (f.0, f.1)).collect();
        // the started delivery whole, ConsumeOk, OpenOk; nothing else
        assert_eq!(kinds, vec![(1, 1), (2, 1), (3, 1), (1, 1), (1, 2)]);
        assert_eq!(frames[3].2, vec![0, 60, 0, 21]);
        assert_eq!(frames[4].2, vec![0, 20, 0, 11]);
        assert!(dropped > 7000, "{dropped}");
        assert!(o.capacity() < o.len() + 64, "memory kept: {}", o.capacity());
    }

    #[test]
    fn replies_are_kept_only_up_to_a_small_bound() {
        // A client that never reads but asks for a lot (DeclareOks): a
        // condemned buffer must not keep megabytes counted in the budget.
        let mut o = OutBuf::new();
        for _ in 0..20_000 {
            method_frame(&mut o, 1, (50, 11));
        }
        let before = o.len();
        o.drop_unsent();
        assert!(before > 300_000);
        assert!(o.len() <= KEEP_REPLIES, "{} bytes kept", o.len());
        assert!(o.len() > KEEP_REPLIES - 100, "the first replies are kept");
        assert!(o.capacity() < KEEP_REPLIES + 1024);
        assert_eq!(parse(o.bytes()).len() * 22, o.len());
    }

    #[test]
    fn a_started_body_keeps_its_remaining_content_frames() {
        let mut o = OutBuf::new();
        method_frame(&mut o, 1, method::BASIC_DELIVER);
        put_frame(o.tail(), 2, 1, &[0; 14]);
        put_frame(o.tail(), 3, 1, &[1; 100]);
        put_frame(o.tail(), 3, 1, &[2; 100]); // second body frame, not started
        delivery(&mut o, 1, 100);
        let first = 8 + 14 + 8 + 14 + 50; // inside the first body frame
        let mut written = o.bytes()[..first].to_vec();
        o.consume(first);
        o.drop_unsent();
        written.extend_from_slice(o.bytes());
        let kinds: Vec<_> = parse(&written).iter().map(|f| f.0).collect();
        assert_eq!(kinds, vec![1, 2, 3, 3]);
    }

    #[test]
    fn at_a_frame_boundary_only_the_other_frames_are_left() {
        let mut o = OutBuf::new();
        delivery(&mut o, 1, 100);
        delivery(&mut o, 1, 100);
        let one = o.len() / 2;
        o.consume(one);
        assert_eq!(o.drop_unsent(), one);
        assert!(o.is_empty());
        put_frame(o.tail(), 1, 0, b"close");
        assert_eq!(parse(o.bytes()).len(), 1);
    }

    #[test]
    fn many_small_partial_writes_track_the_boundary() {
        let mut o = OutBuf::new();
        for _ in 0..300 {
            delivery(&mut o, 1, 61);
        }
        let mut written = Vec::new();
        let mut step = 1;
        while o.len() > 5000 {
            let n = step.min(o.len());
            written.extend_from_slice(&o.bytes()[..n]);
            o.consume(n);
            step = step % 997 + 13;
        }
        o.drop_unsent();
        written.extend_from_slice(o.bytes());
        let frames = parse(&written);
        assert!(frames.len() > 600);
        // whole deliveries only: method, header, body
        assert_eq!(frames.len() % 3, 0, "{:?}", &frames[frames.len() - 3..]);
    }

    #[test]
    fn compaction_moves_the_live_bytes_and_keeps_the_boundary() {
        let mut o = bodies(2000, 100);
        let mut written = Vec::new();
        for _ in 0..1500 {
            written.extend_from_slice(&o.bytes()[..107]);
            o.consume(107);
        }
        assert!(o.buf.len() < 2000 * 108, "never compacted");
        // Bodies of a delivery started before: all kept.
        o.drop_unsent();
        written.extend_from_slice(o.bytes());
        assert_eq!(parse(&written).len(), 2000);
    }

    #[test]
    fn a_protocol_header_is_not_mistaken_for_a_frame() {
        let mut o = OutBuf::new();
        o.tail().extend_from_slice(b"AMQP\x00\x00\x09\x01");
        o.consume(3);
        assert_eq!(o.bytes(), b"P\x00\x00\x09\x01");
        o.drop_unsent();
        assert_eq!(o.bytes(), b"P\x00\x00\x09\x01");
    }
}
