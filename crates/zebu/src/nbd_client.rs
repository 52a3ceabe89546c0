//! A small blocking NBD client, for moving data into and out of Zebu without another tool
//! (`zebu volume create --from`): fixed newstyle, `NBD_OPT_GO`, simple replies, many requests
//! in flight matched by handle (servers may answer out of order).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use zebu_proto::nbd::*;

/// Where an NBD export is: `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub at: Endpoint,
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(String),
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            Endpoint::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///{}?socket={p}", self.export),
        }
    }
}

/// Whether `s` names an NBD export rather than a file.
pub fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://") || s.starts_with("nbds")
}

pub fn parse_uri(s: &str) -> Result<NbdUri, String> {
    if s.starts_with("nbds") {
        return Err(format!(
            "{s}: NBD over TLS is not supported here yet; serve the export on loopback or a unix socket, or copy it to a file first"
        ));
    }
    if let Some(rest) = s.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let export = path.strip_prefix('/').unwrap_or(path).to_owned();
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("{s}: an nbd+unix URI needs ?socket=PATH"))?;
        return Ok(NbdUri {
            at: Endpoint::Unix(socket.to_owned()),
            export,
        });
    }
    let rest = s.strip_prefix("nbd://").ok_or_else(|| {
        format!("{s}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    })?;
    let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(format!("{s}: the URI names no host"));
    }
    let addr = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !host.ends_with(']')
    {
        host.to_owned()
    } else {
        format!("{host}:10809")
    };
    Ok(NbdUri {
        at: Endpoint::Tcp(addr),
        export: export.split('?').next().unwrap_or("").to_owned(),
    })
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One connection to an export, past negotiation.
pub struct Client {
    stream: io::BufWriter<Box<dyn Stream>>,
    rd: Box<dyn Stream>,
    size: u64,
    flags: u16,
    next_handle: u64,
    /// Requests sent and not answered yet: handle → bytes a READ's reply carries.
    pending: HashMap<u64, u32>,
    what: String,
}

fn bad(what: &str, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {why}"))
}

fn rep_name(kind: u32) -> &'static str {
    match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not on this platform",
        REP_ERR_TLS_REQD => "TLS is required",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    }
}

impl Client {
    pub fn connect(uri: &NbdUri) -> io::Result<Client> {
        let what = uri.to_string();
        let (rd, wr): (Box<dyn Stream>, Box<dyn Stream>) = match &uri.at {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(|e| {
                    io::Error::new(e.kind(), format!("{what}: cannot connect: {e}"))
                })?;
                let _ = s.set_nodelay(true);
                (Box::new(s.try_clone()?), Box::new(s))
            }
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(|e| {
                    io::Error::new(e.kind(), format!("{what}: cannot connect: {e}"))
                })?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
        };
        let mut c = Client {
            stream: io::BufWriter::with_capacity(1 << 20, wr),
            rd,
            size: 0,
            flags: 0,
            next_handle: 1,
            pending: HashMap::new(),
            what,
        };
        c.negotiate(&uri.export)?;
        Ok(c)
    }

    fn negotiate(&mut self, export: &str) -> io::Result<()> {
        let mut hello = [0u8; 18];
        self.rd.read_exact(&mut hello)?;
        if u64::from_be_bytes(hello[..8].try_into().unwrap()) != NBDMAGIC
            || u64::from_be_bytes(hello[8..16].try_into().unwrap()) != IHAVEOPT
        {
            return Err(bad(&self.what, "not an NBD server (or not newstyle)"));
        }
        let sflags = u16::from_be_bytes([hello[16], hello[17]]);
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad(
                &self.what,
                "the server does not speak fixed newstyle NBD",
            ));
        }
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if sflags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        let mut out = Vec::new();
        out.extend_from_slice(&cflags.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        out.extend_from_slice(&(export.len() as u32).to_be_bytes());
        out.extend_from_slice(export.as_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        self.stream.write_all(&out)?;
        self.stream.flush()?;
        let mut got_export = false;
        loop {
            let mut h = [0u8; 20];
            self.rd.read_exact(&mut h)?;
            if u64::from_be_bytes(h[..8].try_into().unwrap()) != REPLY_OPT_MAGIC {
                return Err(bad(&self.what, "bad option reply"));
            }
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            if len > 1 << 20 {
                return Err(bad(&self.what, "option reply too large"));
            }
            let mut data = vec![0u8; len as usize];
            self.rd.read_exact(&mut data)?;
            if kind & (1 << 31) != 0 {
                let msg = String::from_utf8_lossy(&data);
                return Err(io::Error::other(format!(
                    "{}: export {export:?}: {}{}",
                    self.what,
                    rep_name(kind),
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!(" ({msg})")
                    }
                )));
            }
            match kind {
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    self.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    self.flags = u16::from_be_bytes([data[10], data[11]]);
                    got_export = true;
                }
                REP_ACK => break,
                _ => {}
            }
        }
        if !got_export {
            return Err(bad(&self.what, "the server did not say the export's size"));
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, data: &[u8]) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&length.to_be_bytes());
        self.stream.write_all(&h)?;
        self.stream.write_all(data)?;
        self.pending
            .insert(handle, if kind == CMD_READ { length } else { 0 });
        Ok(handle)
    }

    /// Send a READ; its data comes back from [`Client::complete`].
    pub fn submit_read(&mut self, offset: u64, length: u32) -> io::Result<u64> {
        self.request(CMD_READ, offset, length, &[])
    }

    pub fn submit_write(&mut self, offset: u64, data: &[u8]) -> io::Result<u64> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
    }

    /// Make `len` bytes at `offset` read as zeroes: WRITE_ZEROES where the server takes it (it
    /// may punch a hole), else written zeroes. Each request is answered by [`Client::complete`].
    pub fn submit_zero(&mut self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeroes = self.flags & TFLAG_SEND_WRITE_ZEROES != 0;
        while offset < end {
            let n = (end - offset).min(if zeroes { 1 << 30 } else { 1 << 20 });
            if zeroes {
                self.request(CMD_WRITE_ZEROES, offset, n as u32, &[])?;
            } else {
                self.request(CMD_WRITE, offset, n as u32, &vec![0u8; n as usize])?;
            }
            offset += n;
        }
        Ok(())
    }

    /// The next reply: its handle and, for a READ, its data. An error reply is an error.
    pub fn complete(&mut self) -> io::Result<(u64, Vec<u8>)> {
        self.stream.flush()?;
        let mut h = [0u8; 16];
        self.rd.read_exact(&mut h)?;
        if u32::from_be_bytes(h[..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
            return Err(bad(&self.what, "unexpected reply (not a simple reply)"));
        }
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let Some(len) = self.pending.remove(&handle) else {
            return Err(bad(
                &self.what,
                format!("a reply for unknown handle {handle}"),
            ));
        };
        if error != 0 {
            return Err(io::Error::other(format!(
                "{}: the server answered error {error} ({})",
                self.what,
                io::Error::from_raw_os_error(error as i32)
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data)?;
        Ok((handle, data))
    }

    /// Wait for every request sent, then FLUSH and wait for it.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.complete()?;
        }
        if self.flags & TFLAG_SEND_FLUSH != 0 {
            self.request(CMD_FLUSH, 0, 0, &[])?;
            self.complete()?;
        }
        Ok(())
    }

    /// End the connection politely.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
        let _ = self.stream.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let u = parse_uri("nbd://127.0.0.1:10810/vol").unwrap();
        assert_eq!(u.at, Endpoint::Tcp("127.0.0.1:10810".into()));
        assert_eq!(u.export, "vol");
        let u = parse_uri("nbd://host").unwrap();
        assert_eq!(u.at, Endpoint::Tcp("host:10809".into()));
        assert_eq!(u.export, "");
        let u = parse_uri("nbd+unix:///disk?socket=/run/x.sock").unwrap();
        assert_eq!(u.at, Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "disk");
        assert!(parse_uri("nbd+unix:///disk").is_err());
        assert!(parse_uri("nbds://host/x").unwrap_err().contains("TLS"));
        assert!(parse_uri("nbd:///x").is_err());
        assert!(is_uri("nbd://h/x") && !is_uri("/tmp/disk.img"));
    }
}
