//! Splitting a client's byte stream into frames (a 4-byte big-endian length,
//! then that many bytes), without a read buffer per connection: bytes are
//! read into a buffer on the stack and frames are handed on from there. Only
//! the start of a frame that did not arrive whole is kept, in a buffer that
//! exists while the frame is incomplete. An idle connection holds no buffer.

use bytes::BytesMut;

/// A frame's length header.
pub const HEADER_BYTES: usize = 4;

/// A frame whose header announces more than the limit. It is refused from
/// the header alone: nothing of that size is buffered or reserved.
#[derive(Debug, thiserror::Error)]
#[error("frame size too big: the header announces {announced} bytes, the limit is {limit}")]
pub struct TooBig {
    /// The length the header announced.
    pub announced: u64,
    /// The limit.
    pub limit: usize,
}

/// The frames of one connection's byte stream.
pub struct Frames {
    /// The start of a frame that has not arrived whole (header included).
    partial: BytesMut,
    frame_bytes_max: usize,
}

/// What [`Frames::feed`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Fed {
    /// Whole frames handed on.
    pub frames: usize,
    /// Whether the handler asked to stop; unhandled bytes are kept.
    pub stopped: bool,
}

impl Frames {
    /// Frames of at most `frame_bytes_max` bytes (not counting the header).
    pub fn new(frame_bytes_max: usize) -> Self {
        Frames {
            partial: BytesMut::new(),
            frame_bytes_max,
        }
    }

    /// Whether bytes of a frame have arrived but not the whole frame (or
    /// whole frames wait because a handler stopped).
    pub fn mid_frame(&self) -> bool {
        !self.partial.is_empty()
    }

    /// Takes bytes just read (or none, to go on with bytes kept from an
    /// earlier stop) and hands each whole frame to `on_frame` in order,
    /// until it returns false. Bytes not handed on are kept for the next
    /// call.
    ///
    /// # Errors
    /// [`TooBig`] when a header announces a frame over the limit; the stream
    /// cannot go on after that.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut on_frame: impl FnMut(&[u8]) -> bool,
    ) -> Result<Fed, TooBig> {
        let mut fed = Fed {
            frames: 0,
            stopped: false,
        };
        if self.partial.is_empty() {
            let used = self.split(bytes, &mut on_frame, &mut fed)?;
            if used < bytes.len() {
                self.partial.extend_from_slice(&bytes[used..]);
            }
            return Ok(fed);
        }
        self.partial.extend_from_slice(bytes);
        let partial = std::mem::take(&mut self.partial);
        let result = self.split(&partial, &mut on_frame, &mut fed);
        let used = match result {
            Ok(used) => used,
            Err(e) => {
                self.partial = partial;
                return Err(e);
            }
        };
        if used < partial.len() {
            // Reuse the buffer for what is left, unless it is the large
            // buffer of a frame that is done.
            let mut partial = partial;
            let _ = partial.split_to(used);
            self.partial = if partial.capacity() > 4 * 1024 && partial.len() < 1024 {
                BytesMut::from(&partial[..])
            } else {
                partial
            };
        }
        Ok(fed)
    }

    /// Hands on the whole frames at the start of `bytes`; returns how many
    /// bytes they took.
    fn split(
        &self,
        bytes: &[u8],
        on_frame: &mut impl FnMut(&[u8]) -> bool,
        fed: &mut Fed,
    ) -> Result<usize, TooBig> {
        let mut at = 0;
        while bytes.len() - at >= HEADER_BYTES {
            let header: [u8; HEADER_BYTES] = bytes[at..at + HEADER_BYTES]
                .try_into()
                .expect("a slice of the header's length");
            let announced = u32::from_be_bytes(header);
            let len = usize::try_from(announced)
                .ok()
                .filter(|&len| len <= self.frame_bytes_max)
                .ok_or(TooBig {
                    announced: u64::from(announced),
                    limit: self.frame_bytes_max,
                })?;
            let end = at + HEADER_BYTES + len;
            if bytes.len() < end {
                break;
            }
            fed.frames += 1;
            let keep_going = on_frame(&bytes[at + HEADER_BYTES..end]);
            at = end;
            if !keep_going {
                fed.stopped = true;
                break;
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    fn feed_all(frames: &mut Frames, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        frames
            .feed(bytes, |f| {
                out.push(f.to_vec());
                true
            })
            .unwrap();
        out
    }

    #[test]
    fn frames_split_at_any_byte_come_out_whole_and_in_order() {
        let mut stream = frame(b"one");
        stream.extend(frame(b""));
        stream.extend(frame(&[7; 300]));
        stream.extend(frame(b"four"));
        for cut in 0..stream.len() {
            for second_cut in cut..stream.len() {
                let mut frames = Frames::new(1024);
                let mut out = feed_all(&mut frames, &stream[..cut]);
                out.extend(feed_all(&mut frames, &stream[cut..second_cut]));
                out.extend(feed_all(&mut frames, &stream[second_cut..]));
                assert_eq!(
                    out,
                    vec![b"one".to_vec(), vec![], vec![7; 300], b"four".to_vec()],
                    "cut at {cut} and {second_cut}"
                );
                assert!(!frames.mid_frame());
            }
        }
    }

    #[test]
    fn a_header_alone_counts_as_inside_a_frame() {
        let mut frames = Frames::new(1024);
        assert!(feed_all(&mut frames, &[0, 0, 0, 3]).is_empty());
        assert!(frames.mid_frame());
        assert_eq!(feed_all(&mut frames, b"abc"), vec![b"abc".to_vec()]);
        assert!(!frames.mid_frame());
    }

    #[test]
    fn a_stop_keeps_the_rest_for_the_next_feed() {
        let mut frames = Frames::new(1024);
        let mut stream = frame(b"hello");
        stream.extend(frame(b"next"));
        stream.extend(&[0, 0]);
        let mut seen = Vec::new();
        let fed = frames
            .feed(&stream, |f| {
                seen.push(f.to_vec());
                false
            })
            .unwrap();
        assert_eq!(
            fed,
            Fed {
                frames: 1,
                stopped: true
            }
        );
        assert_eq!(seen, vec![b"hello".to_vec()]);
        assert!(frames.mid_frame());
        assert_eq!(feed_all(&mut frames, &[]), vec![b"next".to_vec()]);
        assert!(frames.mid_frame(), "half a header is still there");
    }

    #[test]
    fn a_header_over_the_limit_is_refused_before_its_body() {
        let mut frames = Frames::new(10);
        let err = frames
            .feed(&[0xff, 0xff, 0xff, 0xff, b'{'], |_| true)
            .unwrap_err();
        assert_eq!(err.announced, u64::from(u32::MAX));
        assert!(err.to_string().starts_with("frame size too big"), "{err}");
        assert!(frames.partial.capacity() < 1024, "nothing was reserved");
        let mut frames = Frames::new(10);
        assert_eq!(feed_all(&mut frames, &frame(&[1; 10])), vec![vec![1; 10]]);
    }

    #[test]
    fn a_large_buffer_is_not_kept_for_a_small_rest() {
        let mut frames = Frames::new(1 << 20);
        let mut stream = frame(&[1; 100_000]);
        stream.extend(&[0, 0, 0, 2, b'x']);
        assert!(feed_all(&mut frames, &stream[..50_000]).is_empty());
        assert_eq!(feed_all(&mut frames, &stream[50_000..]).len(), 1);
        assert!(frames.mid_frame());
        assert!(frames.partial.capacity() < 4 * 1024);
        assert_eq!(feed_all(&mut frames, b"y"), vec![b"xy".to_vec()]);
        assert!(!frames.mid_frame());
    }
}
