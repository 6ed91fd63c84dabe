//! A small authoritative DNS server on 127.0.0.1:0 (UDP), whose records a test changes while traffic flows.
//!
//! It answers A and AAAA questions from its table with the table's TTL, NXDOMAIN for unknown names, and
//! SERVFAIL for names the test marked as failing. Enough of RFC 1035 for a resolver to use it; nothing else.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

#[derive(Default)]
struct Table {
    records: HashMap<String, Vec<IpAddr>>,
    failing: Vec<String>,
    ttl: u32,
}

/// The running server; dropping it stops it.
pub struct DnsServer {
    addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind dns: {e}"));
        let addr = sock.local_addr().unwrap_or_else(|e| panic!("dns addr: {e}"));
        let table = Arc::new(Mutex::new(Table {
            ttl: 1,
            ..Default::default()
        }));
        let queries = Arc::new(AtomicU64::new(0));
        let (t, q) = (table.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::Relaxed);
                if let Some(resp) = answer(&buf[..n], &t) {
                    let _ = sock.send_to(&resp, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            table,
            queries,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Set a name's addresses (replacing any), and stop failing it.
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.records
            .insert(name.trim_end_matches('.').to_ascii_lowercase(), ips.to_vec());
        t.failing.retain(|n| n != name);
    }

    /// Answer SERVFAIL for a name until it is `set` again.
    pub fn fail(&self, name: &str) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failing
            .push(name.to_string());
    }

    pub fn set_ttl(&self, ttl: u32) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).ttl = ttl;
    }

    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

fn answer(q: &[u8], table: &Mutex<Table>) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // The question: labels up to the zero byte, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    let question = q.get(12..question_end)?;
    let name = labels.join(".");
    let t = table.lock().ok()?;
    let (rcode, ips): (u8, Vec<IpAddr>) = if t.failing.contains(&name) {
        (2, Vec::new())
    } else {
        match t.records.get(&name) {
            Some(ips) => (
                0,
                ips.iter()
                    .copied()
                    .filter(|ip| (qtype == 1 && ip.is_ipv4()) || (qtype == 28 && ip.is_ipv6()))
                    .collect(),
            ),
            None => (3, Vec::new()),
        }
    };
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]);
    let rd = q[2] & 0x01;
    r.push(0x84 | rd); // QR, AA, RD copied
    r.push(rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(question);
    for ip in ips {
        r.extend_from_slice(&[0xc0, 0x0c]);
        match ip {
            IpAddr::V4(v4) => {
                r.extend_from_slice(&1u16.to_be_bytes());
                r.extend_from_slice(&1u16.to_be_bytes());
                r.extend_from_slice(&t.ttl.to_be_bytes());
                r.extend_from_slice(&4u16.to_be_bytes());
                r.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                r.extend_from_slice(&28u16.to_be_bytes());
                r.extend_from_slice(&1u16.to_be_bytes());
                r.extend_from_slice(&t.ttl.to_be_bytes());
                r.extend_from_slice(&16u16.to_be_bytes());
                r.extend_from_slice(&v6.octets());
            }
        }
    }
    Some(r)
}
