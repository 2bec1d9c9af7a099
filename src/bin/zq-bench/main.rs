//! `zq-bench`: what zq's data path moves, next to the pipes it replaces.
//!
//! `throughput` sends N bytes from a synthetic source (no ZFS) to a discarding sink through
//! zq's real data path (chunks hashed with BLAKE3 per chunk and per stream, framed, over
//! one QUIC stream of a pinned TLS 1.3 connection, checked on arrival) and, in the same run,
//! through a plain TCP socket (the unencrypted ceiling) and, given `--ssh`, through
//! `ssh … 'cat >/dev/null'`. The sink runs as a child process so that each side's CPU time
//! and memory are its own. `sink` + `link` measure the same to a real remote host.

// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use zq_net::{Client, Fingerprint, FramedRecv, FramedSend, Identity};
use zq_proto::{Compression, Compressor, Message, StepDecoder, StepEncoder, StepEvent};

mod relay;

/// Chunk size of the data path (as `zq-send`'s).
const CHUNK: usize = 256 * 1024;
/// The synthetic source cycles through this much generated data (a multiple of CHUNK,
/// larger than zstd's window, small next to the windows measured).
const POOL: usize = 16 * 1024 * 1024;

/// Measure zq's data path against TCP and SSH pipes.
#[derive(Parser, Debug)]
#[command(name = "zq-bench", version)]
struct Cli {
    #[command(flatten)]
    log: zq::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compare zq's data path with TCP and SSH pipes on this host
    ///
    /// Moves --size bytes through zq, a TCP pipe and (with --ssh) an SSH pipe on this
    /// host and prints rate, CPU per GB on each side, peak memory and the ratios.
    Throughput {
        #[command(flatten)]
        load: Load,
        /// Also through `ssh ARGS 'cat >/dev/null'` (ARGS split on spaces, e.g.
        /// "-c aes128-gcm@openssh.com -p 2222 user@127.0.0.1").
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        ssh: Option<String>,
        #[command(flatten)]
        transport: zq::TransportArgs,
    },
    /// Receive and discard what `link` (or `throughput`) sends
    ///
    /// Prints `listening on ADDR`, then one `sink …` line per connection with its CPU time
    /// and peak memory.
    Sink {
        /// UDP address to listen on (TCP with --tcp).
        #[arg(long, default_value = "[::]:7447", value_name = "ADDR")]
        listen: SocketAddr,
        /// Identity directory (a zq-recv identity: `zq-recv keygen DIR`).
        #[arg(long, value_name = "DIR", required_unless_present = "tcp")]
        identity: Option<PathBuf>,
        /// The sender's fingerprint.
        #[arg(long, value_name = "FINGERPRINT", required_unless_present = "tcp")]
        allow: Option<Fingerprint>,
        /// A plain TCP sink instead (the unencrypted reference).
        #[arg(long)]
        tcp: bool,
        /// Exit after this many connections (0: never).
        #[arg(long, default_value_t = 0)]
        connections: u32,
        #[command(flatten)]
        transport: zq::TransportArgs,
    },
    /// Emulate a WAN link between two TUN devices (for kernels without netem)
    ///
    /// Rate, RTT and loss, each direction; runs until killed. See benches/wan.
    Relay {
        /// One end's TUN device, NAME or NAME@NETNS (`ip -n NETNS tuntap add NAME mode tun`).
        #[arg(long, value_name = "DEVICE")]
        a: String,
        /// The other end's.
        #[arg(long, value_name = "DEVICE")]
        b: String,
        /// Link rate in bits per second (1G, 100M).
        #[arg(long, default_value = "1G", value_parser = zq::parse_size)]
        rate: u64,
        /// Round-trip time: half of it is added in each direction.
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        rtt: Duration,
        /// Packets lost at random, in percent, each direction.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// The link's queue in bytes [default: one bandwidth-delay product].
        #[arg(long, value_parser = zq::parse_size)]
        queue: Option<u64>,
    },
    /// Send --size bytes to a `zq-bench sink` on another host through zq's data path
    Link {
        /// The sink's address (a `zq-bench sink`, or one with --tcp for --tcp).
        #[arg(long, value_name = "HOST:PORT", required_unless_present = "ssh")]
        to: Option<String>,
        /// The sink's fingerprint (its identity's).
        #[arg(long, value_name = "FINGERPRINT", required_unless_present_any = ["tcp", "ssh"])]
        peer: Option<Fingerprint>,
        /// Identity directory of this side (a zq-send identity).
        #[arg(long, value_name = "DIR", required_unless_present_any = ["tcp", "ssh"])]
        identity: Option<PathBuf>,
        /// Send over plain TCP instead (the unencrypted reference).
        #[arg(long, conflicts_with = "ssh")]
        tcp: bool,
        /// Send through `ssh ARGS 'cat >/dev/null'` instead (the SSH reference).
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        ssh: Option<String>,
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        transport: zq::TransportArgs,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct Load {
    /// Bytes to move per method.
    #[arg(long, default_value = "2GiB", value_name = "SIZE", value_parser = zq::parse_size)]
    size: u64,
    /// What the source generates: random (incompressible) or text (compresses ~3x).
    #[arg(long, default_value = "random")]
    data: Data,
    /// zq's chunk compression, as zq-send --compress (none, auto, zstd, zstd:LEVEL).
    #[arg(long, default_value = "none", value_name = "MODE")]
    compress: Compression,
    /// zq's rate limit, as zq-send --bwlimit (bytes per second after compression).
    #[arg(long, value_name = "SIZE", value_parser = zq::parse_size)]
    bwlimit: Option<u64>,
    /// zq's parallel connections, as zq-send --connections: the chunks are striped over
    /// N connections from the first one.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    connections: u8,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Data {
    Random,
    Text,
}

/// One method's figures.
#[derive(Debug, Default, Clone)]
struct Run {
    bytes: u64,
    secs: f64,
    send_cpu: f64,
    recv_cpu: f64,
    send_rss_kib: u64,
    recv_rss_kib: Option<u64>,
    /// Payload bytes on the wire, where compression made them differ.
    wire_bytes: Option<u64>,
}

impl Run {
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn per_gb(&self, cpu: f64) -> f64 {
        cpu / (self.bytes as f64 / 1e9)
    }
    fn print(&self, name: &str) {
        let rss = |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.0}", k as f64 / 1024.0));
        let wire = self.wire_bytes.map_or(String::new(), |w| {
            format!(
                "; on the wire {w} payload bytes ({:.1}%)",
                w as f64 * 100.0 / self.bytes as f64
            )
        });
        println!(
            "{name:<6} {:>9.1} MB/s  cpu s/GB send {:>5.2} recv {:>5.2}  peak RSS MiB send {:>5} recv {:>5}  ({} bytes in {:.2} s{wire})",
            self.mb_s(),
            self.per_gb(self.send_cpu),
            self.per_gb(self.recv_cpu),
            rss(Some(self.send_rss_kib)),
            rss(self.recv_rss_kib),
            self.bytes,
            self.secs
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.log.json();
    let main = async move { zq::exit::done(run(cli.command).await) };
    zq::block_on(json, main)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Throughput {
            load,
            ssh,
            transport,
        } => throughput(load, ssh, transport).await,
        Command::Sink {
            listen,
            identity,
            allow,
            tcp,
            connections,
            transport,
        } => match (tcp, identity, allow) {
            (true, _, _) => tcp_sink(listen, connections).await,
            (false, Some(dir), Some(fp)) => {
                zq_sink(listen, &dir, fp, connections, &transport).await
            }
            _ => bail!("sink: --identity and --allow are required without --tcp"),
        },
        Command::Relay {
            a,
            b,
            rate,
            rtt,
            loss,
            queue,
        } => {
            if !(0.0..100.0).contains(&loss) || rate == 0 {
                bail!("--loss must be in 0..100 and --rate above 0");
            }
            let bdp = (rate as f64 / 8.0 * rtt.as_secs_f64()) as u64;
            let link = relay::Link {
                rate,
                delay: rtt / 2,
                loss: loss / 100.0,
                queue: usize::try_from(queue.unwrap_or(bdp).max(64 * 1024)).unwrap_or(usize::MAX),
            };
            let (ta, tb) = (relay::open_tun(&a)?, relay::open_tun(&b)?);
            let (ta2, tb2) = (ta.try_clone()?, tb.try_clone()?);
            let ab = std::thread::spawn(move || relay::run(ta, tb, link, 0x9e37_79b9_7f4a_7c15));
            let ba = std::thread::spawn(move || relay::run(tb2, ta2, link, 0xd1b5_4a32_d192_ed03));
            println!("relay ready: {a} <-> {b}, {link:?}");
            for t in [ab, ba] {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a relay thread panicked"))??;
            }
            Ok(())
        }
        Command::Link {
            to,
            peer,
            identity,
            tcp,
            ssh,
            load,
            transport,
        } => {
            let (name, run) = match (to, peer, identity, tcp, ssh) {
                (_, _, _, _, Some(args)) => ("ssh", ssh_send(&args, &load).await?),
                (Some(to), _, _, true, None) => {
                    ("tcp", tcp_send(zq_net::resolve(&to).await?, &load).await?)
                }
                (Some(to), Some(peer), Some(dir), false, None) => {
                    let identity = Identity::load(&dir, "zq-send")?;
                    let addr = zq_net::resolve(&to).await?;
                    (
                        "zq",
                        zq_send(addr, identity, peer, &load, &transport).await?,
                    )
                }
                _ => bail!("link: --to with --peer and --identity, --to with --tcp, or --ssh"),
            };
            run.print(name);
            Ok(())
        }
    }
}

async fn throughput(
    load: Load,
    ssh: Option<String>,
    transport: zq::TransportArgs,
) -> anyhow::Result<()> {
    println!(
        "zq-bench throughput: {} bytes of {:?} data per method, chunks of {CHUNK} bytes, zq compression {}",
        load.size, load.data, load.compress
    );
    let keys = tempfile::tempdir()?;
    let recv_fp = Identity::generate(keys.path(), "zq-recv")?;
    let send_fp = Identity::generate(keys.path(), "zq-send")?;
    let exe = std::env::current_exe()?;
    let mut zq_args: Vec<String> = vec![
        "sink".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--identity".into(),
        keys.path().display().to_string(),
        "--allow".into(),
        send_fp.to_string(),
        "--connections".into(),
        "1".into(),
    ];
    zq_args.extend(transport_args(&transport));
    let mut sink = Sink::start(&exe, &zq_args).await?;
    let identity = Identity::load(keys.path(), "zq-send")?;
    let mut zq = zq_send(sink.addr, identity, recv_fp, &load, &transport).await?;
    sink.finish(&mut zq).await?;
    zq.print("zq");

    let mut sink = Sink::start(
        &exe,
        &[
            "sink",
            "--tcp",
            "--listen",
            "127.0.0.1:0",
            "--connections",
            "1",
        ]
        .map(String::from),
    )
    .await?;
    let mut tcp = tcp_send(sink.addr, &load).await?;
    sink.finish(&mut tcp).await?;
    tcp.print("tcp");

    let ssh = match ssh {
        Some(args) => {
            let run = ssh_send(&args, &load).await?;
            run.print("ssh");
            Some(run)
        }
        None => None,
    };
    println!(
        "ratios: zq/tcp {:.2}x{}",
        zq.mb_s() / tcp.mb_s(),
        ssh.map(|s| format!(
            ", zq/ssh {:.2}x (cpu s/GB zq {:.2} vs ssh {:.2}, both sides)",
            zq.mb_s() / s.mb_s(),
            zq.per_gb(zq.send_cpu + zq.recv_cpu),
            s.per_gb(s.send_cpu + s.recv_cpu)
        ))
        .unwrap_or_default()
    );
    Ok(())
}

fn transport_args(t: &zq::TransportArgs) -> Vec<String> {
    vec![
        "--bdp".into(),
        t.bdp.to_string(),
        "--congestion".into(),
        match t.congestion {
            zq_net::Congestion::Cubic => "cubic".into(),
            zq_net::Congestion::Bbr => "bbr".into(),
        },
        "--udp-buffer".into(),
        t.udp_buffer.to_string(),
    ]
}

/// The generated data the source cycles through.
fn pool(data: Data) -> Bytes {
    let mut buf = vec![0u8; POOL];
    // BLAKE3's output stream: incompressible, and fast to make.
    blake3::Hasher::new()
        .update(b"zq-bench")
        .finalize_xof()
        .fill(&mut buf);
    if let Data::Text = data {
        // Words from a small vocabulary, chosen by the random bytes: compresses about 3x
        // with zstd, like logs or source code.
        const WORDS: &[&str] = &[
            "the ",
            "zfs ",
            "snapshot ",
            "of ",
            "pool ",
            "dataset ",
            "send ",
            "receive ",
            "stream ",
            "and ",
            "a ",
            "to ",
            "incremental ",
            "error ",
            "= ",
            "0x",
            "\n",
            "{ ",
            "} ",
            "fn ",
            "let ",
            "if ",
            "return ",
            "bytes ",
            "time ",
            "2026-11-26 ",
            "INFO ",
        ];
        let random = buf.clone();
        let mut out = Vec::with_capacity(POOL + 64);
        let mut i = 0;
        while out.len() < POOL {
            let r = random[i % random.len()] as usize;
            out.extend_from_slice(WORDS[r % WORDS.len()].as_bytes());
            if r.is_multiple_of(7) {
                out.extend_from_slice(format!("{} ", random[(i + 1) % random.len()]).as_bytes());
            }
            i += 1;
        }
        out.truncate(POOL);
        buf = out;
    }
    Bytes::from(buf)
}

/// The source: `size` bytes as chunks sliced (not copied) out of the pool.
fn chunks(pool: &Bytes, size: u64) -> impl Iterator<Item = Bytes> + '_ {
    let mut sent = 0u64;
    std::iter::from_fn(move || {
        if sent >= size {
            return None;
        }
        let off = (sent % pool.len() as u64) as usize;
        let n = CHUNK.min((size - sent) as usize).min(pool.len() - off);
        sent += n as u64;
        Some(pool.slice(off..off + n))
    })
}

/// CPU seconds (user + system) and peak RSS (KiB) of this process, or of its waited-for
/// children.
fn usage(who: libc::c_int) -> (f64, u64) {
    // SAFETY: rusage is plain integers and timevals, for which all zeroes is a value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the struct we own and lend it.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return (0.0, 0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(ru.ru_utime) + secs(ru.ru_stime),
        u64::try_from(ru.ru_maxrss).unwrap_or(0),
    )
}

/// Busy CPU time of the whole machine so far, in seconds (from /proc/stat).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

/// zq's data path, sending side.
async fn zq_send(
    addr: SocketAddr,
    identity: Identity,
    peer: Fingerprint,
    load: &Load,
    transport: &zq::TransportArgs,
) -> anyhow::Result<Run> {
    let pool = pool(load.data);
    let tuning = transport.tuning().shared_by(load.connections);
    let client = Client::new(identity, peer, addr, &tuning)?;
    let conn = client.connect(addr).await?;
    let mut conns = vec![conn.clone()];
    for _ in 1..load.connections {
        conns.push(client.connect(addr).await?);
    }
    let (cpu0, _) = usage(libc::RUSAGE_SELF);
    let started = Instant::now();
    let (send, recv) = conn.open_bi().await?;
    let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
    let mut striped = None;
    if conns.len() > 1 {
        let set = zq_proto::Stripes {
            id: zq_repl::stripe::new_id(),
            count: load.connections,
        };
        send.send(&Message::Stripes(set)).await?;
        striped = Some(zq_repl::stripe::StripeSender::open(&conns, set).await?);
    }
    let mut encoder = StepEncoder::new();
    let mut compressor = Compressor::new(load.compress);
    let limit = load.bwlimit.filter(|&b| b > 0).map(zq_net::RateLimit::new);
    let mut wire = 0u64;
    for chunk in chunks(&pool, load.size) {
        let hash = encoder.chunk(&chunk);
        if compressor.is_active() {
            compressor.set_link_rate(zq_repl::sender::link_rate(&conn, limit.as_ref()));
        }
        let payload = zq_repl::sender::compress_chunk(&mut compressor, chunk).await?;
        wire += payload.wire_len() as u64;
        if let Some(limit) = &limit {
            limit.take(payload.wire_len()).await;
        }
        match striped.as_mut() {
            Some(s) => s.send(hash, payload).await?,
            None => send.send_payload(&hash, payload).await?,
        }
    }
    if let Some(s) = striped {
        s.finish().await?;
    }
    let end = encoder.end();
    send.send(&Message::StepEnd(end.clone())).await?;
    send.finish()?;
    match recv.message("StepEnd").await? {
        Message::StepEnd(got) if got == end => {}
        other => bail!(
            "the sink answered {} instead of the stream's end",
            other.name()
        ),
    }
    let secs = started.elapsed().as_secs_f64();
    let (cpu1, rss) = usage(libc::RUSAGE_SELF);
    let stats = conn.stats();
    tracing::info!(
        mtu = stats.path.current_mtu,
        rtt_ms = stats.path.rtt.as_secs_f64() * 1e3,
        cwnd = stats.path.cwnd,
        lost_packets = stats.path.lost_packets,
        sent_packets = stats.path.sent_packets,
        "path"
    );
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    client.shutdown().await;
    Ok(Run {
        bytes: load.size,
        secs,
        send_cpu: cpu1 - cpu0,
        send_rss_kib: rss,
        wire_bytes: compressor.is_active().then_some(wire),
        ..Run::default()
    })
}

/// zq's data path, receiving side: every chunk and the stream verified, then dropped.
/// Connections are served at once (a striping sender opens several); one `sink …` line
/// is printed per connection that carried a step, when it closes.
async fn zq_sink(
    listen: SocketAddr,
    dir: &std::path::Path,
    allow: Fingerprint,
    connections: u32,
    transport: &zq::TransportArgs,
) -> anyhow::Result<()> {
    let identity = Identity::load(dir, "zq-recv")?;
    let endpoint = zq_net::server(identity, [allow], listen, &transport.tuning())?;
    println!("listening on {}", endpoint.local_addr()?);
    let stripes = std::sync::Arc::new(zq_repl::stripe::StripeRegistry::default());
    let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel();
    let mut count = 0;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            Some(()) = served.recv() => {
                count += 1;
                if count == connections {
                    break;
                }
                continue;
            }
        };
        let (stripes, served_tx) = (stripes.clone(), served_tx.clone());
        tokio::spawn(async move {
            if sink_connection(incoming, stripes, allow).await {
                let _ = served_tx.send(());
            }
        });
    }
    Ok(())
}

/// One connection of the sink; true if it carried a step (not only stripe streams).
async fn sink_connection(
    incoming: quinn::Incoming,
    stripes: std::sync::Arc<zq_repl::stripe::StripeRegistry>,
    allow: Fingerprint,
) -> bool {
    let (cpu0, _) = usage(libc::RUSAGE_SELF);
    // A connection that fails (a lost path, a refused key) is reported; the sink stays
    // for the next one.
    let result = async {
        let conn = incoming.await?;
        let mut streams = tokio::task::JoinSet::new();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let stripes = stripes.clone();
            streams.spawn(async move {
                let r = sink_stream(send, recv, stripes, allow).await;
                if let Err(e) = &r {
                    // At once: the connection's line comes only when it closes.
                    tracing::warn!(error = %zq::chain(e.as_ref()), "sink stream failed");
                }
                r
            });
        }
        let (mut bytes, mut steps) = (0, 0);
        while let Some(r) = streams.join_next().await {
            if let Some(b) = r?? {
                bytes += b;
                steps += 1;
            }
        }
        if let Some(reason) = conn
            .close_reason()
            .filter(|r| !matches!(r, quinn::ConnectionError::ApplicationClosed(_)))
        {
            anyhow::bail!("connection failed after {bytes} bytes: {reason}");
        }
        Ok::<_, anyhow::Error>((bytes, steps))
    }
    .await;
    let (cpu1, rss) = usage(libc::RUSAGE_SELF);
    match result {
        Ok((_, 0)) => false,
        Ok((bytes, _)) => {
            println!("sink bytes={bytes} cpu={:.3} rss_kib={rss}", cpu1 - cpu0);
            true
        }
        Err(e) => {
            println!("sink error: {}", zq::chain(e.as_ref()));
            true
        }
    }
}

/// One stream of a sink's connection: every chunk and the end checked, the end echoed.
/// `None` for a stripe stream, which goes to the step that claims it.
async fn sink_stream(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    stripes: std::sync::Arc<zq_repl::stripe::StripeRegistry>,
    peer: Fingerprint,
) -> anyhow::Result<Option<u64>> {
    let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
    let mut decoder = StepDecoder::with_zstd()?;
    let mut bytes = 0;
    let first = recv.next().await?;
    if let Some(zq_proto::Frame::Message(Message::StripeJoin(j))) = first {
        stripes
            .deliver(peer, j, recv)
            .map_err(|e| anyhow::anyhow!(e))?;
        return Ok(None);
    }
    let mut frames = zq_repl::stripe::StepFrames::new(&mut recv, Some((stripes, peer)));
    let mut next = match first {
        Some(zq_proto::Frame::Message(Message::Stripes(set))) => {
            frames.stripe(set).map_err(|e| anyhow::anyhow!(e))?;
            frames.next().await.map_err(|e| anyhow::anyhow!(e))?
        }
        other => other,
    };
    while let Some(frame) = next {
        let end = match &frame {
            zq_proto::Frame::Message(Message::StepEnd(e)) => Some(e.clone()),
            _ => None,
        };
        if let (StepEvent::Complete { total_len, .. }, Some(end)) = (decoder.on_frame(frame)?, end)
        {
            bytes += total_len;
            send.send(&Message::StepEnd(end)).await?;
            send.finish()?;
        }
        next = frames.next().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(Some(bytes))
}

/// The unencrypted reference: bytes into a TCP socket.
async fn tcp_send(addr: SocketAddr, load: &Load) -> anyhow::Result<Run> {
    let pool = pool(load.data);
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let (cpu0, _) = usage(libc::RUSAGE_SELF);
    let started = Instant::now();
    for chunk in chunks(&pool, load.size) {
        stream.write_all(&chunk).await?;
    }
    stream.shutdown().await?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    let secs = started.elapsed().as_secs_f64();
    let (cpu1, rss) = usage(libc::RUSAGE_SELF);
    Ok(Run {
        bytes: load.size,
        secs,
        send_cpu: cpu1 - cpu0,
        send_rss_kib: rss,
        ..Run::default()
    })
}

async fn tcp_sink(listen: SocketAddr, connections: u32) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let mut buf = vec![0u8; CHUNK];
    for served in 1.. {
        let (mut stream, _) = listener.accept().await?;
        let (cpu0, _) = usage(libc::RUSAGE_SELF);
        let mut bytes = 0u64;
        loop {
            match stream.read(&mut buf).await? {
                0 => break,
                n => bytes += n as u64,
            }
        }
        stream.write_all(&[1]).await?;
        let (cpu1, rss) = usage(libc::RUSAGE_SELF);
        println!("sink bytes={bytes} cpu={:.3} rss_kib={rss}", cpu1 - cpu0);
        if served == connections {
            break;
        }
    }
    Ok(())
}

/// The SSH reference: `ssh ARGS 'cat >/dev/null'` fed from the same source. The remote
/// side's CPU is the machine's busy time less this process and the ssh client (so run it
/// on a quiet machine); its memory is not known.
async fn ssh_send(args: &str, load: &Load) -> anyhow::Result<Run> {
    let pool = pool(load.data);
    let mut child = tokio::process::Command::new("ssh")
        .args(args.split_whitespace())
        .arg("cat >/dev/null")
        .stdin(Stdio::piped())
        .spawn()
        .context("running ssh")?;
    let mut stdin = child.stdin.take().context("ssh's stdin")?;
    let (self0, _) = usage(libc::RUSAGE_SELF);
    let (children0, _) = usage(libc::RUSAGE_CHILDREN);
    let busy0 = machine_busy();
    let started = Instant::now();
    for chunk in chunks(&pool, load.size) {
        stdin.write_all(&chunk).await?;
    }
    drop(stdin);
    let status = child.wait().await?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("ssh exited with {status}");
    }
    let (self1, rss) = usage(libc::RUSAGE_SELF);
    let (children, _) = usage(libc::RUSAGE_CHILDREN);
    let send_cpu = self1 - self0 + children - children0;
    Ok(Run {
        bytes: load.size,
        secs,
        send_cpu,
        recv_cpu: (machine_busy() - busy0 - send_cpu).max(0.0),
        send_rss_kib: rss,
        recv_rss_kib: None,
        wire_bytes: None,
    })
}

/// A sink child process.
struct Sink {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    addr: SocketAddr,
}

impl Sink {
    async fn start(exe: &std::path::Path, args: &[String]) -> anyhow::Result<Sink> {
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the sink")?;
        let stdout = child.stdout.take().context("the sink's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the sink did not start")??
            .unwrap_or_default();
        let addr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the sink said {first:?}"))?;
        Ok(Sink { child, lines, addr })
    }

    /// Reads the sink's figures into `run` and waits for it to exit.
    async fn finish(&mut self, run: &mut Run) -> anyhow::Result<()> {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .context("the sink did not report")??
            .unwrap_or_default();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let bytes: u64 = field("bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
        if bytes != run.bytes {
            bail!("the sink received {bytes} bytes of {}: {line}", run.bytes);
        }
        run.recv_cpu = field("cpu").and_then(|v| v.parse().ok()).unwrap_or(0.0);
        run.recv_rss_kib = field("rss_kib").and_then(|v| v.parse().ok());
        self.child.wait().await?;
        Ok(())
    }
}
