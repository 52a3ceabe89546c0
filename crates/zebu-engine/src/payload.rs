//! Reading a payload of known length into a fresh buffer without zeroing it first: on a 1 MiB
//! write, zeroing the buffer the socket then overwrites costs as much as a checksum pass.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Read exactly `n` bytes. Fails with `UnexpectedEof` if the stream ends first.
pub async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, n: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(n);
    // Never reads past the payload, whatever spare capacity the buffer has.
    let mut limited = AsyncReadExt::take(&mut *rd, n as u64);
    while buf.len() < n {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_exactly_the_payload_and_leaves_the_rest() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut rd = tokio::io::BufReader::with_capacity(4096, &data[..]);
        let a = read_payload(&mut rd, 200_000).await.unwrap();
        assert_eq!(&a[..], &data[..200_000]);
        let b = read_payload(&mut rd, 100_000).await.unwrap();
        assert_eq!(&b[..], &data[200_000..]);
        let e = read_payload(&mut rd, 1).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(read_payload(&mut rd, 0).await.unwrap().is_empty());
    }
}
