//! A user-space WAN link between two TUN devices: what netem would do, for kernels
//! without it. Each direction gets a rate limit (a serialization queue of bounded depth,
//! tail drop), a one-way delay and random loss; packets are IP datagrams, relayed
//! unchanged, so TCP (SSH) and QUIC cross the same path.
//!
//! The devices are attached by name, in their network namespaces (`ip -n NS tuntap add
//! NAME mode tun` makes them persistent), so that a relay can be restarted with another
//! profile while the namespaces, their addresses and their servers stay.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One direction's link.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Bits per second.
    pub rate: u64,
    /// One-way delay.
    pub delay: Duration,
    /// Probability that a packet is dropped.
    pub loss: f64,
    /// Most bytes queued for serialization before packets are dropped (the router's
    /// buffer).
    pub queue: usize,
}

/// Opens the TUN device `spec`: `NAME`, or `NAME@NETNS` for a device in the network
/// namespace `ip netns` calls NETNS (entered for the open, then left).
pub fn open_tun(spec: &str) -> anyhow::Result<File> {
    let Some((name, netns)) = spec.split_once('@') else {
        return attach(spec);
    };
    let here = File::open("/proc/thread-self/ns/net").context("our network namespace")?;
    let there = File::open(format!("/var/run/netns/{netns}"))
        .with_context(|| format!("network namespace {netns}"))?;
    // SAFETY: setns on namespace fds we hold; only this thread changes namespace.
    if unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {netns}"));
    }
    let tun = attach(name);
    // SAFETY: as above.
    if unsafe { libc::setns(here.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("returning to our namespace");
    }
    tun
}

/// Attaches to the TUN device `name` of this thread's namespace (raw IP packets, no
/// packet-information header).
fn attach(name: &str) -> anyhow::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then the flags (a short) in the union.
    let mut ifreq = [0u8; 40];
    if name.len() >= 16 {
        bail!("{name:?}: a device name has at most 15 bytes");
    }
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which ifreq is large enough for.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("attaching to {name}"));
    }
    Ok(file)
}

/// Relays packets read from `from` into `to` through `link`, until reading fails.
pub fn run(mut from: File, mut to: File, link: Link, seed: u64) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for (due, packet) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A full device queue on the far side drops, like a wire would.
            let _ = to.write(&packet);
        }
        Ok(())
    });
    let mut rng = seed | 1;
    let mut next_free = Instant::now();
    let mut buf = vec![0u8; 65536];
    let ns_per_byte = 8e9 / link.rate as f64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        // xorshift64*: uniform enough for loss.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let r = (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        if r < link.loss {
            continue;
        }
        let now = Instant::now();
        let start = next_free.max(now);
        // What is queued ahead of this packet, in bytes at the link rate.
        let backlog = (start - now).as_nanos() as f64 / ns_per_byte;
        if backlog as usize + n > link.queue {
            continue;
        }
        next_free = start + Duration::from_nanos((n as f64 * ns_per_byte) as u64);
        if tx
            .send((next_free + link.delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the relay's writer panicked"))??;
    Ok(())
}
