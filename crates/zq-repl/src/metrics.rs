//! Prometheus metrics (`--metrics-listen ADDR`). A sender daemon: per dataset replication
//! lag, steps, failures, bytes and resumes; the connection's RTT, congestion window and
//! losses. A receiver: per target steps, failures, bytes and resumes; each sender
//! connection's statistics. Both: how long `zfs` commands take. Text exposition format
//! 0.0.4 over plain HTTP, rendered at each scrape from what the program keeps anyway.
//!
//! The HTTP side is a few lines on tokio's TcpListener rather than hyper or axum: it
//! answers one GET, reads at most [`MAX_REQUEST`] bytes of request head within
//! [`REQUEST_TIMEOUT`], and closes; a web framework would outweigh the rest of zq-send.
//! The encoder is ours too: prometheus-client's registry keeps its own copy of every value,
//! while the daemon already has them in its status.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::sender::Sender;
use crate::status::Status;

/// Longest request head read from a scraper.
pub const MAX_REQUEST: usize = 8192;

/// How long a scraper may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Text exposition format, one family after another.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a metric family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample of the current family (`name` may carry a suffix such as `_bucket`).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        v.to_string()
    }
}

/// What a daemon publishes for scrapes.
#[derive(Debug, Default)]
pub struct DaemonMetrics {
    status: Mutex<Option<Status>>,
    sender: Mutex<Option<watch::Receiver<Option<Arc<Sender>>>>>,
}

impl DaemonMetrics {
    /// The daemon's newest status (written with the status file, at most once a second).
    pub fn set_status(&self, status: Status) {
        if let Ok(mut s) = self.status.lock() {
            *s = Some(status);
        }
    }

    /// Where the daemon announces its current connection.
    pub fn watch_sender(&self, rx: watch::Receiver<Option<Arc<Sender>>>) {
        if let Ok(mut s) = self.sender.lock() {
            *s = Some(rx);
        }
    }

    /// The metrics now, as text.
    pub fn render(&self) -> String {
        let mut e = Exposition::default();
        let status = self.status.lock().ok().and_then(|s| s.clone());
        let conn = self
            .sender
            .lock()
            .ok()
            .and_then(|s| s.as_ref().and_then(|rx| rx.borrow().clone()))
            .map(|s| s.connection().clone());
        e.family(
            "zq_connected",
            "gauge",
            "1 while the daemon has a connection to its receiver.",
        );
        e.sample("zq_connected", &[], f64::from(u8::from(conn.is_some())));
        if let Some(status) = &status {
            datasets(&mut e, status);
        }
        if let Some(conn) = &conn {
            connections(&mut e, &[(Vec::new(), conn.stats())]);
        }
        zfs_timings(&mut e, &zq_store::timing::timings());
        e.finish()
    }
}

/// What a receiver counts per target since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCounts {
    /// Steps committed.
    pub steps: u64,
    /// Steps that failed.
    pub failures: u64,
    /// Stream bytes of the committed steps.
    pub bytes: u64,
    /// Steps resumed from the spool.
    pub resumes: u64,
}

/// A sender's connection, while it is open.
#[derive(Debug)]
struct LiveConn {
    sender: String,
    remote: String,
    conn: quinn::Connection,
}

/// What a receiver publishes for scrapes (`zq-recv serve --metrics-listen`).
#[derive(Debug, Default)]
pub struct ReceiverMetrics {
    targets: Mutex<BTreeMap<String, TargetCounts>>,
    conns: Mutex<BTreeMap<u64, LiveConn>>,
    next_conn: AtomicU64,
}

/// Removes a connection from [`ReceiverMetrics`] when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    metrics: Arc<ReceiverMetrics>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = self.metrics.conns.lock() {
            c.remove(&self.id);
        }
    }
}

impl ReceiverMetrics {
    /// Counts something that happened to `target`.
    pub fn count(&self, target: &str, f: impl FnOnce(&mut TargetCounts)) {
        if let Ok(mut t) = self.targets.lock() {
            f(t.entry(target.to_string()).or_default());
        }
    }

    /// A sender connected (`sender`: its short fingerprint); listed until the guard drops.
    pub fn connected(
        self: &Arc<Self>,
        sender: String,
        remote: std::net::SocketAddr,
        conn: quinn::Connection,
    ) -> ConnGuard {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.conns.lock() {
            c.insert(
                id,
                LiveConn {
                    sender,
                    remote: remote.to_string(),
                    conn,
                },
            );
        }
        ConnGuard {
            metrics: self.clone(),
            id,
        }
    }

    /// The metrics now, as text.
    pub fn render(&self) -> String {
        let mut e = Exposition::default();
        let conns: Vec<(Vec<(String, String)>, quinn::ConnectionStats)> = self
            .conns
            .lock()
            .map(|c| {
                c.values()
                    .map(|l| {
                        let labels = vec![
                            ("sender".to_string(), l.sender.clone()),
                            ("remote".to_string(), l.remote.clone()),
                        ];
                        (labels, l.conn.stats())
                    })
                    .collect()
            })
            .unwrap_or_default();
        e.family(
            "zq_receiver_connections",
            "gauge",
            "Sender connections open now.",
        );
        e.sample("zq_receiver_connections", &[], conns.len() as f64);
        let targets = self.targets.lock().map(|t| t.clone()).unwrap_or_default();
        type Get = fn(&TargetCounts) -> u64;
        let families: [(&str, &str, Get); 4] = [
            (
                "zq_received_steps_total",
                "Steps committed into the target.",
                |c| c.steps,
            ),
            (
                "zq_receive_failures_total",
                "Steps into the target that failed.",
                |c| c.failures,
            ),
            (
                "zq_received_bytes_total",
                "Stream bytes of the committed steps.",
                |c| c.bytes,
            ),
            (
                "zq_received_resumes_total",
                "Steps resumed from the spool.",
                |c| c.resumes,
            ),
        ];
        for (name, help, get) in families {
            e.family(name, "counter", help);
            for (target, c) in &targets {
                e.sample(name, &[("target", target)], get(c) as f64);
            }
        }
        connections(&mut e, &conns);
        zfs_timings(&mut e, &zq_store::timing::timings());
        e.finish()
    }
}

fn datasets(e: &mut Exposition, status: &Status) {
    type Get = fn(&crate::status::DatasetStatus) -> Option<f64>;
    let families: [(&str, &str, &str, Get); 8] = [
        (
            "zq_replication_lag_seconds",
            "gauge",
            "Age of the newest snapshot the receiver committed.",
            |d| d.lag_seconds,
        ),
        (
            "zq_unsent_snapshots",
            "gauge",
            "Snapshots zq created that are not replicated yet.",
            |d| Some(d.unsent as f64),
        ),
        (
            "zq_dataset_failing",
            "gauge",
            "1 while the dataset's last attempt failed.",
            |d| Some(f64::from(u8::from(d.error.is_some()))),
        ),
        (
            "zq_steps_total",
            "counter",
            "Replication steps the receiver committed.",
            |d| Some(d.steps as f64),
        ),
        (
            "zq_step_failures_total",
            "counter",
            "Attempts that failed (each is retried).",
            |d| Some(d.failures as f64),
        ),
        (
            "zq_sent_bytes_total",
            "counter",
            "Stream bytes sent in committed steps (before compression).",
            |d| Some(d.bytes as f64),
        ),
        (
            "zq_resumes_total",
            "counter",
            "Interrupted steps resumed from the receiver's spool.",
            |d| Some(d.resumes as f64),
        ),
        (
            "zq_resumed_bytes_total",
            "counter",
            "Stream bytes those resumes did not send again.",
            |d| Some(d.resumed_bytes as f64),
        ),
    ];
    for (name, kind, help, get) in families {
        e.family(name, kind, help);
        for d in &status.datasets {
            if let Some(v) = get(d) {
                e.sample(name, &[("source", &d.source), ("target", &d.target)], v);
            }
        }
    }
}

/// Statistics of each connection (with its labels): one family per statistic.
fn connections(e: &mut Exposition, conns: &[(Vec<(String, String)>, quinn::ConnectionStats)]) {
    type Get = fn(&quinn::ConnectionStats) -> f64;
    let families: [(&str, &str, &str, Get); 7] = [
        (
            "zq_connection_rtt_seconds",
            "gauge",
            "Smoothed round-trip time of the connection.",
            |s| s.path.rtt.as_secs_f64(),
        ),
        (
            "zq_connection_cwnd_bytes",
            "gauge",
            "Congestion window of the connection.",
            |s| s.path.cwnd as f64,
        ),
        (
            "zq_connection_mtu_bytes",
            "gauge",
            "UDP payload size the connection's MTU discovery reached.",
            |s| f64::from(s.path.current_mtu),
        ),
        (
            "zq_connection_sent_packets_total",
            "counter",
            "Packets sent on the connection.",
            |s| s.path.sent_packets as f64,
        ),
        (
            "zq_connection_lost_packets_total",
            "counter",
            "Packets of the connection declared lost.",
            |s| s.path.lost_packets as f64,
        ),
        (
            "zq_connection_lost_bytes_total",
            "counter",
            "Bytes of the connection declared lost.",
            |s| s.path.lost_bytes as f64,
        ),
        (
            "zq_connection_congestion_events_total",
            "counter",
            "Congestion events (window reductions) of the connection.",
            |s| s.path.congestion_events as f64,
        ),
    ];
    if conns.is_empty() {
        return;
    }
    for (name, kind, help, get) in families {
        e.family(name, kind, help);
        for (labels, stats) in conns {
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            e.sample(name, &labels, get(stats));
        }
    }
}

fn zfs_timings(e: &mut Exposition, timings: &[(String, zq_store::timing::Timing)]) {
    const NAME: &str = "zq_zfs_command_duration_seconds";
    e.family(
        NAME,
        "histogram",
        "How long zfs commands took, by subcommand (send and receive: the whole stream).",
    );
    for (command, t) in timings {
        let mut cumulative = 0;
        for (bound, n) in zq_store::timing::BUCKETS.iter().zip(t.buckets) {
            cumulative += n;
            let le = bound.to_string();
            e.sample(
                &format!("{NAME}_bucket"),
                &[("command", command), ("le", &le)],
                cumulative as f64,
            );
        }
        e.sample(
            &format!("{NAME}_bucket"),
            &[("command", command), ("le", "+Inf")],
            t.count as f64,
        );
        e.sample(&format!("{NAME}_sum"), &[("command", command)], t.sum);
        e.sample(
            &format!("{NAME}_count"),
            &[("command", command)],
            t.count as f64,
        );
    }
}

/// Serves `render()` on `GET /metrics` to every client of `listener`, until dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, render)).await;
        });
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = match request_target(&head) {
        Some(("GET", "/metrics")) => response(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(),
        ),
        Some(("GET", _)) => response(
            "404 Not Found",
            "text/plain; charset=utf-8",
            "zq serves its metrics on /metrics\n",
        ),
        _ => response(
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "expected GET /metrics\n",
        ),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Method and path of an HTTP/1.x request head.
fn request_target(head: &[u8]) -> Option<(&str, &str)> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split(' ');
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    version.starts_with("HTTP/1.").then_some((method, path))
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_label_values() {
        let mut e = Exposition::default();
        e.family("zq_x", "gauge", "Help\nwith a newline.");
        e.sample("zq_x", &[("source", "a\"b\\c\nd"), ("le", "0.5")], 1.5);
        e.sample("zq_x", &[], f64::INFINITY);
        assert_eq!(
            e.finish(),
            "# HELP zq_x Help with a newline.\n# TYPE zq_x gauge\n\
             zq_x{source=\"a\\\"b\\\\c\\nd\",le=\"0.5\"} 1.5\nzq_x +Inf\n"
        );
    }

    #[test]
    fn requests_are_parsed_or_refused() {
        assert_eq!(
            request_target(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_target(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_target(b"\xff\xfe"), None);
        assert_eq!(request_target(b""), None);
    }

    #[test]
    fn histograms_are_cumulative_with_inf_count() {
        let mut t = zq_store::timing::Timing::default();
        t.buckets[0] = 2;
        t.buckets[2] = 1;
        t.count = 4;
        t.sum = 100.0;
        let mut e = Exposition::default();
        zfs_timings(&mut e, &[("send".into(), t)]);
        let text = e.finish();
        assert!(
            text.contains("_bucket{command=\"send\",le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("_bucket{command=\"send\",le=\"0.025\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("_bucket{command=\"send\",le=\"300\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("_bucket{command=\"send\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("_count{command=\"send\"} 4\n"), "{text}");
    }
}
