//! Helpers shared by the fuzz targets.

/// `data` with its last 4 bytes replaced by the CRC32C of the rest (little-endian), so that
/// mutations get past a frame's checksum to the parser behind it.
pub fn with_trailing_crc(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() >= 4 {
        let n = v.len() - 4;
        let crc = crc32c::crc32c(&v[..n]);
        v[n..].copy_from_slice(&crc.to_le_bytes());
    }
    v
}
