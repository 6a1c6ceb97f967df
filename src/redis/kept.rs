//! Connections kept open between the polls of a wait, one per endpoint. A wait that asked on a
//! new connection every 100 ms cost the process asked an RSA-4096 signature per poll, on the
//! thread that serves TMM (a DB) or runs the failover (a sentinel); inside a switchover's pause
//! each handshake is paused writes. Proofs never use these: they need new handshakes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use super::resp::Connection;
use super::tls::TlsClient;
use super::RedisError;

pub struct Kept<'a> {
    tls: &'a TlsClient,
    server_name: &'a str,
    links: RefCell<BTreeMap<String, Connection>>,
}

impl<'a> Kept<'a> {
    pub fn new(tls: &'a TlsClient, server_name: &'a str) -> Self {
        Kept {
            tls,
            server_name,
            links: RefCell::new(BTreeMap::new()),
        }
    }

    /// Asks the process at `endpoint` on the connection kept for it, else on a new one (by
    /// `deadline`) that is kept if it answers. A kept connection that fails at the socket (the
    /// process restarted since) is replaced once by a new one; any other error closes it.
    pub fn ask<T>(
        &self,
        endpoint: &str,
        deadline: Instant,
        question: impl Fn(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let kept = self.links.borrow().contains_key(endpoint);
        match self.ask_once(endpoint, deadline, &question) {
            Err(RedisError::Io { .. }) if kept => self.ask_once(endpoint, deadline, &question),
            answer => answer,
        }
    }

    /// `ask`, never sent twice: a failed question closes the connection (a reply may be left
    /// half-read) and is not retried. For a question that must not be repeated (`SENTINEL
    /// FAILOVER`), and inside a pause, whose caller decides whether another try is worth it.
    pub fn ask_once<T>(
        &self,
        endpoint: &str,
        deadline: Instant,
        question: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let kept = self.links.borrow_mut().remove(endpoint);
        let mut conn = match kept {
            Some(c) => c,
            None => Connection::connect(self.tls, endpoint, self.server_name, deadline)?,
        };
        let answer = question(&mut conn);
        if answer.is_ok() {
            self.links.borrow_mut().insert(endpoint.to_string(), conn);
        }
        answer
    }
}
