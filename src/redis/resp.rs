//! A minimal blocking RESP2 client over mutual TLS: one command at a time, each bounded by a
//! deadline (connect, handshake, write and read all count against it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::tls::{fingerprint, TlsClient};
use super::RedisError;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The reply as text: simple strings, bulk strings and integers.
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Simple(s) => Some(s.clone()),
            Value::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    pub fn items(&self) -> &[Value] {
        match self {
            Value::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The longest reply line (type byte, text or length, CRLF) read: the replies used here are
/// short status lines and lengths.
pub const MAX_LINE: u64 = 64 * 1024;
/// The longest bulk string: `INFO` and `CONFIG GET` replies are a few KB.
pub const MAX_BULK: i64 = 1024 * 1024;
/// The most elements of one array (`SENTINEL REPLICAS` lists a few dozen fields per replica).
pub const MAX_ARRAY: i64 = 10_000;
/// The deepest nesting: Redis' replies here are at most two levels deep.
pub const MAX_DEPTH: usize = 4;

/// Reads one reply, within the limits above: a server (or whoever answers on its port) cannot
/// make the client allocate more than it actually sends, nor read a line without end.
pub fn read_value(r: &mut impl BufRead, depth: usize) -> std::io::Result<Value> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = Vec::new();
    r.by_ref().take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad(if line.len() as u64 >= MAX_LINE {
            format!("reply line longer than {MAX_LINE} bytes")
        } else {
            "reply line not terminated by CRLF".into()
        }));
    }
    let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let int = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| bad("bad length or integer".into()))
    };
    Ok(match line[0] {
        b'+' => Value::Simple(body),
        b'-' => Value::Error(body),
        b':' => Value::Int(int(&body)?),
        b'$' => match int(&body)? {
            -1 => Value::Bulk(None),
            n if (0..=MAX_BULK).contains(&n) => {
                // Read what arrives, not what is claimed: no allocation up front.
                let mut buf = Vec::new();
                r.by_ref().take(n as u64 + 2).read_to_end(&mut buf)?;
                if buf.len() as u64 != n as u64 + 2 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if !buf.ends_with(b"\r\n") {
                    return Err(bad("bulk string not terminated by CRLF".into()));
                }
                buf.truncate(n as usize);
                Value::Bulk(Some(buf))
            }
            n => {
                return Err(bad(format!(
                    "bulk length {n} out of range (at most {MAX_BULK})"
                )))
            }
        },
        b'*' => match int(&body)? {
            -1 => Value::Array(None),
            _ if depth >= MAX_DEPTH => {
                return Err(bad(format!("reply nested deeper than {MAX_DEPTH}")))
            }
            n if (0..=MAX_ARRAY).contains(&n) => Value::Array(Some(
                (0..n)
                    .map(|_| read_value(r, depth + 1))
                    .collect::<Result<_, _>>()?,
            )),
            n => {
                return Err(bad(format!(
                    "array length {n} out of range (at most {MAX_ARRAY})"
                )))
            }
        },
        _ => return Err(bad("unknown reply type".into())),
    })
}

/// How an error says the server sent a TLS alert (and nothing else does).
const REFUSED_BY_ALERT: &str = "the server refused the handshake";

/// What a handshake came to, for proofs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// The server accepted our certificate (it answered PING).
    Accepted,
    /// The server refused it with a TLS alert (the message names it).
    Refused(String),
}

/// Connects with `tls` and says whether the server accepted its certificate or refused it with a
/// TLS alert. Anything else (no answer before the deadline, a closed connection, no route) is
/// neither, and an error: a proof that a leaf is refused needs the server's alert.
pub fn handshake(
    tls: &TlsClient,
    endpoint: &str,
    server_name: &str,
    deadline: Instant,
) -> Result<Handshake, RedisError> {
    match Connection::connect(tls, endpoint, server_name, deadline) {
        Ok(_) => Ok(Handshake::Accepted),
        Err(RedisError::Io { detail, .. }) if detail.starts_with(REFUSED_BY_ALERT) => {
            Ok(Handshake::Refused(detail))
        }
        Err(e) => Err(e),
    }
}

type Stream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// One mutual-TLS connection to a DB or a sentinel.
pub struct Connection {
    endpoint: String,
    io: BufReader<Stream>,
    served: Option<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn remaining(endpoint: &str, deadline: Instant, what: &str) -> Result<Duration, RedisError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(RedisError::Timeout {
            endpoint: endpoint.to_string(),
            what: what.to_string(),
        });
    }
    Ok(left)
}

impl Connection {
    /// Connects and completes the handshake (Redis' TLS accept is lazy: a PING proves the server
    /// accepted our certificate).
    pub fn connect(
        tls: &TlsClient,
        endpoint: &str,
        server_name: &str,
        deadline: Instant,
    ) -> Result<Self, RedisError> {
        let io_err = |detail: String| RedisError::Io {
            endpoint: endpoint.to_string(),
            detail,
        };
        let addr = endpoint
            .to_socket_addrs()
            .map_err(|e| io_err(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| io_err("no address".into()))?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| io_err(format!("server name {server_name:?}: {e}")))?;
        let tcp = TcpStream::connect_timeout(&addr, remaining(endpoint, deadline, "connect")?)
            .map_err(|e| io_err(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let conn = rustls::ClientConnection::new(Arc::clone(&tls.config), name)
            .map_err(|e| io_err(format!("TLS setup: {e}")))?;
        let mut c = Connection {
            endpoint: endpoint.to_string(),
            io: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            served: None,
        };
        let pong = c.command(&["PING"], deadline)?;
        if pong != Value::Simple("PONG".into()) {
            return Err(RedisError::Unexpected {
                endpoint: endpoint.to_string(),
                command: "PING".into(),
                reply: format!("{pong:?}"),
            });
        }
        c.served =
            c.io.get_ref()
                .conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| fingerprint(leaf.as_ref()));
        Ok(c)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// SHA-256 fingerprint of the certificate the server presented in this handshake.
    pub fn served_fingerprint(&self) -> Option<&str> {
        self.served.as_deref()
    }

    /// Sends one command and reads its reply; an error reply is returned as `Value::Error`.
    pub fn command(&mut self, args: &[&str], deadline: Instant) -> Result<Value, RedisError> {
        let what = args.first().copied().unwrap_or("");
        let left = remaining(&self.endpoint, deadline, what)?;
        let tcp = &self.io.get_ref().sock;
        let _ = tcp.set_read_timeout(Some(left));
        let _ = tcp.set_write_timeout(Some(left));
        let endpoint = self.endpoint.clone();
        let io_err = |e: std::io::Error| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                return RedisError::Timeout {
                    endpoint: endpoint.clone(),
                    what: what.to_string(),
                };
            }
            let detail = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::AlertReceived(a)) => format!(
                    "{REFUSED_BY_ALERT} (alert {a:?}): it does not accept our client certificate"
                ),
                Some(rustls::Error::InvalidCertificate(c)) => {
                    crate::redis::tls::describe_refused_certificate(c)
                }
                _ if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    "the server closed the connection".to_string()
                }
                _ => e.to_string(),
            };
            RedisError::Io {
                endpoint: endpoint.clone(),
                detail,
            }
        };
        let stream = self.io.get_mut();
        stream.write_all(&encode(args)).map_err(io_err)?;
        stream.flush().map_err(io_err)?;
        read_value(&mut self.io, 0).map_err(io_err)
    }

    /// Reads the next value without sending anything: a pushed message of a subscribed
    /// connection. A read cut by `deadline` leaves the stream unusable (drop the connection).
    pub fn receive(&mut self, deadline: Instant) -> Result<Value, RedisError> {
        let left = remaining(&self.endpoint, deadline, "a pushed message")?;
        let _ = self.io.get_ref().sock.set_read_timeout(Some(left));
        read_value(&mut self.io, 0).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => RedisError::Timeout {
                endpoint: self.endpoint.clone(),
                what: "a pushed message".into(),
            },
            _ => RedisError::Io {
                endpoint: self.endpoint.clone(),
                detail: e.to_string(),
            },
        })
    }

    /// Like `command`, but an error reply is an error naming the command.
    pub fn call(&mut self, args: &[&str], deadline: Instant) -> Result<Value, RedisError> {
        match self.command(args, deadline)? {
            Value::Error(message) => Err(RedisError::Reply {
                endpoint: self.endpoint.clone(),
                command: args.iter().take(2).copied().collect::<Vec<_>>().join(" "),
                message,
            }),
            v => Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> std::io::Result<Value> {
        read_value(&mut std::io::Cursor::new(bytes.to_vec()), 0)
    }

    #[test]
    fn replies_of_every_type_parse() {
        let cases: &[(&[u8], Value)] = &[
            (b"+OK\r\n", Value::Simple("OK".into())),
            (b"-ERR no\r\n", Value::Error("ERR no".into())),
            (b":42\r\n", Value::Int(42)),
            (b"$3\r\na\r\n\r\n", Value::Bulk(Some(b"a\r\n".to_vec()))),
            (b"$-1\r\n", Value::Bulk(None)),
            (b"*-1\r\n", Value::Array(None)),
            (
                b"*2\r\n$9\r\n127.0.0.1\r\n*1\r\n:1\r\n",
                Value::Array(Some(vec![
                    Value::Bulk(Some(b"127.0.0.1".to_vec())),
                    Value::Array(Some(vec![Value::Int(1)])),
                ])),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                &parse(bytes).unwrap(),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn truncated_or_malformed_replies_are_errors() {
        for bytes in [
            &b""[..],
            b"+OK",
            b"$5\r\nab\r\n",
            b"?x\r\n",
            b":x\r\n",
            b"$-7\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(
                parse(bytes).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    /// The trust-boundary issue: a reply claiming a 512 MiB bulk string was allocated whole
    /// before a byte of it arrived, a line was read without end, and arrays of a million
    /// elements were taken.
    #[test]
    fn replies_beyond_the_limits_are_refused_without_allocating_what_they_claim() {
        let cases: [(Vec<u8>, &str); 5] = [
            (
                b"$536870912\r\nab".to_vec(),
                "bulk length 536870912 out of range",
            ),
            (
                [&b"+"[..], &vec![b'a'; MAX_LINE as usize + 10]].concat(),
                "longer than 65536 bytes",
            ),
            (
                b"*1000000\r\n".to_vec(),
                "array length 1000000 out of range",
            ),
            (
                format!("${MAX_BULK}\r\nshort\r\n").into_bytes(),
                "unexpected end of file",
            ),
            (b"$2\r\nabXY".to_vec(), "not terminated by CRLF"),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        // At the limits: taken.
        let big = [
            format!("${MAX_BULK}\r\n").into_bytes(),
            vec![b'x'; MAX_BULK as usize],
            b"\r\n".to_vec(),
        ]
        .concat();
        assert!(matches!(parse(&big), Ok(Value::Bulk(Some(b))) if b.len() == MAX_BULK as usize));
    }

    /// The trust-boundary issue: a proof counted any failed connection as a refusal, so an
    /// endpoint that never answered "refused" the old leaf. Only a TLS alert is one.
    #[test]
    fn a_timeout_or_a_closed_connection_is_not_a_refusal() {
        use crate::redis::tls::{ClientMaterials, TlsClient};
        let key = crate::pki::PrivateKey::generate(crate::pki::KeyAlgorithm::EcdsaP256).unwrap();
        let ca = crate::pki::issue_ca(
            &crate::pki::issue::default_ca_subject(),
            1,
            &key,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        let m = ClientMaterials {
            ca_cert: ca.clone().into_bytes(),
            leaf_cert: ca.into_bytes(),
            leaf_key: key,
        };
        let tls = TlsClient::new(&m, crate::redis::ClientIdentity::Presented).unwrap();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closing_addr = closing.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in closing.incoming() {
                drop(s);
            }
        });
        let deadline = Instant::now() + Duration::from_millis(500);
        let silent_addr = silent.local_addr().unwrap().to_string();
        let e = handshake(&tls, &silent_addr, "localhost", deadline).unwrap_err();
        assert!(matches!(e, RedisError::Timeout { .. }), "{e}");
        let deadline = Instant::now() + Duration::from_secs(2);
        let e = handshake(&tls, &closing_addr, "localhost", deadline).unwrap_err();
        assert!(matches!(e, RedisError::Io { .. }), "{e}");
        drop(silent);
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        assert_eq!(
            encode(&["CONFIG", "GET", "tls-cert-file"]),
            b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$13\r\ntls-cert-file\r\n".to_vec()
        );
    }
}
