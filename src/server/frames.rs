//! Reading a client's frames with a deadline on each frame's body: the time
//! between frames is the client's (its session timeout bounds it), but once
//! a frame has begun, the rest must follow within `frame_timeout`, so a
//! client that stops mid-frame cannot hold its connection slot and its
//! partial frame's buffer for as long as its session lives.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::{Decoder, FramedRead, LengthDelimitedCodec};

/// The protocol's codec, plus whether a frame has begun and not ended. The
/// length-delimited codec consumes a frame's header before its body comes,
/// so an empty read buffer alone does not tell "between frames" from
/// "inside one".
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    mid_frame: bool,
}

impl FrameCodec {
    /// The protocol's codec refusing frames over `frame_bytes_max`.
    pub fn new(frame_bytes_max: usize) -> Self {
        FrameCodec {
            inner: latchkey_client::protocol::codec(frame_bytes_max),
            mid_frame: false,
        }
    }

    /// Whether bytes of a frame have arrived but not the whole frame.
    pub fn mid_frame(&self) -> bool {
        self.mid_frame
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, io::Error> {
        if !src.is_empty() {
            self.mid_frame = true;
        }
        let frame = self.inner.decode(src)?;
        if frame.is_some() {
            // Bytes left over are the start of the next frame.
            self.mid_frame = !src.is_empty();
        }
        Ok(frame)
    }
}

/// A client's frames, as the server reads them.
pub type FrameReader = FramedRead<OwnedReadHalf, FrameCodec>;

/// What [`next_frame`] found.
pub enum NextFrame {
    /// A whole frame.
    Frame(BytesMut),
    /// The client closed the connection between frames.
    End,
    /// The stream is broken: a frame over the limit (`InvalidData`, refused
    /// from its header before its body is buffered) or an I/O error.
    Failed(io::Error),
    /// A frame began and did not end within the frame timeout.
    Stalled,
}

/// Waits for the next whole frame: without a deadline until its first byte
/// arrives, then at most `frame_timeout` for the rest.
///
/// # Cancel safety
/// Safe: bytes already read stay in `reader`, and the codec keeps its place
/// in the frame; a new call goes on from there, with a new deadline.
pub async fn next_frame(reader: &mut FrameReader, frame_timeout: Duration) -> NextFrame {
    loop {
        if !reader.decoder().mid_frame() {
            // Readiness, not a read: no byte is taken before the deadline
            // below is running.
            if let Err(e) = reader.get_ref().readable().await {
                return NextFrame::Failed(e);
            }
        }
        match tokio::time::timeout(frame_timeout, reader.next()).await {
            Ok(Some(Ok(frame))) => return NextFrame::Frame(frame),
            Ok(Some(Err(e))) => return NextFrame::Failed(e),
            Ok(None) => return NextFrame::End,
            Err(_) if reader.decoder().mid_frame() => return NextFrame::Stalled,
            // Readiness without data (it can be spurious): still between
            // frames.
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumed_header_counts_as_inside_a_frame() {
        let mut codec = FrameCodec::new(1024);
        let mut src = BytesMut::new();
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(!codec.mid_frame());
        src.extend_from_slice(&[0, 0, 0, 3]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(src.is_empty(), "the codec took the header");
        assert!(codec.mid_frame());
        src.extend_from_slice(b"abc");
        assert_eq!(&codec.decode(&mut src).unwrap().unwrap()[..], b"abc");
        assert!(!codec.mid_frame());
    }

    #[test]
    fn bytes_after_a_frame_begin_the_next_one() {
        let mut codec = FrameCodec::new(1024);
        let mut src = BytesMut::from(&[0, 0, 0, 1, b'a', 0][..]);
        assert_eq!(&codec.decode(&mut src).unwrap().unwrap()[..], b"a");
        assert!(codec.mid_frame());
    }
}
