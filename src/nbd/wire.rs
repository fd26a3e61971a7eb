//! Socket helpers shared by the server and the client.

use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes `head` then `data` as one message: through a `BufWriter`, a small
/// message is copied into its buffer and a large one goes out in a single
/// vectored write (header and data in the same syscall, never split by
/// another message since one task owns the writer).
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut head: &[u8],
    mut data: &[u8],
) -> io::Result<()> {
    while !head.is_empty() || !data.is_empty() {
        let n = if head.is_empty() {
            w.write(data).await?
        } else if data.is_empty() {
            w.write(head).await?
        } else {
            w.write_vectored(&[IoSlice::new(head), IoSlice::new(data)]).await?
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"));
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        data = &data[n - from_head..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer taking at most `step` bytes per call, vectored or not.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            let n = b.len().min(self.step);
            self.out.extend_from_slice(&b[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                left -= take;
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_writes_keep_the_message_whole_and_ordered() {
        for step in [1, 3, 7, 16, 1000] {
            let mut w = Trickle { out: Vec::new(), step };
            write_message(&mut w, b"header", b"and the data").await.unwrap();
            write_message(&mut w, b"", b"x").await.unwrap();
            write_message(&mut w, b"h", b"").await.unwrap();
            assert_eq!(w.out, b"headerand the dataxh");
        }
        let mut w = Trickle { out: Vec::new(), step: 0 };
        assert_eq!(write_message(&mut w, b"a", b"b").await.unwrap_err().kind(), io::ErrorKind::WriteZero);
    }
}
