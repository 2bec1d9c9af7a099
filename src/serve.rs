//! `zq-recv serve`'s arguments, here so that `zq-send check-config` can check a config
//! file's receivers with the same definitions. A receiver of a config file is read by
//! them too ([`options`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use zq_net::Fingerprint;
use zq_store::DatasetName;

/// `zq-recv serve`: where to listen, whom to allow, where to spool.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Serve as the receiver this config file describes for this host (see --host);
    /// flags and environment variables given here override the file. See
    /// docs/operations.md, "Config file".
    #[arg(long, value_name = "FILE", env = "ZQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// With --config: the host whose receiver to run [default: this machine's host name].
    #[arg(long, value_name = "NAME", env = "ZQ_HOST", requires = "config")]
    pub host: Option<String>,
    /// UDP address to listen on [default: [::]:7446]. Port 0 picks a free port; the bound
    /// address is printed on stdout as `listening on ADDR`. Under systemd socket
    /// activation (zq-recv.socket) the socket comes from systemd instead: leave it out.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory holding this receiver's identity (see `keygen`).
    #[arg(
        long,
        value_name = "DIR",
        env = "ZQ_IDENTITY",
        required_unless_present = "config"
    )]
    pub identity: Option<PathBuf>,
    /// Allow the sender with this fingerprint to write inside ROOT (repeatable; one root
    /// per sender).
    #[arg(long, value_name = "FINGERPRINT=ROOT", required_unless_present = "config", value_parser = parse_allow)]
    pub allow: Vec<(Fingerprint, DatasetName)>,
    /// Take only raw sends of encrypted datasets (zfs send -w): any other stream is
    /// refused before zfs receive sees a byte, so this host never receives plaintext and
    /// never holds a key of what it receives (a backup host). Senders learn it from
    /// their listings and do not send the rest.
    #[arg(long)]
    pub require_encrypted: bool,
    /// Set PROP to VALUE on every dataset received (zfs receive -o), whatever the stream
    /// or the sender asks; repeatable. E.g. readonly=on on a backup host. Not the
    /// encryption properties; needs OpenZFS (zfs-fuse's receive takes no -o).
    #[arg(long, value_name = "PROP=VALUE", value_parser = parse_property)]
    pub force_property: Vec<(String, String)>,
    /// Never take PROP from a stream that carries properties (zfs receive -x): the
    /// received dataset inherits it here; repeatable. mountpoint, canmount, sharenfs and
    /// sharesmb are always excluded. Not the encryption properties; needs OpenZFS.
    #[arg(long, value_name = "PROP")]
    pub exclude_property: Vec<String>,
    /// The zfs program to run.
    #[arg(long, default_value = "zfs", value_name = "PATH", env = "ZQ_ZFS")]
    pub zfs: PathBuf,
    /// Directory where large steps are spooled so that an interrupted one resumes instead
    /// of starting over. Needs free space for the largest transfer (up to --spool-max).
    #[arg(long, default_value = "/var/lib/zq-recv/spool", value_name = "DIR")]
    pub spool_dir: PathBuf,
    /// Spool steps once their stream passes SIZE (held in memory per step until then);
    /// smaller steps restart when interrupted.
    #[arg(long, default_value = "4MiB", value_name = "SIZE", value_parser = crate::parse_size)]
    pub spool_from: u64,
    /// Spool at most SIZE of one step; the rest of a longer one is not resumable (0: spool
    /// nothing, as --no-spool).
    #[arg(long, default_value = "64GiB", value_name = "SIZE", value_parser = crate::parse_size)]
    pub spool_max: u64,
    /// Spool nothing: every interrupted step starts over (where zfs cannot keep it, see
    /// --resume-with).
    #[arg(long)]
    pub no_spool: bool,
    /// How interrupted steps resume: auto (zfs keeps what an interrupted zfs receive -s
    /// got, and the sender continues with zfs send -t, where both sides' zfs can: OpenZFS;
    /// the spool elsewhere) or spool (always the spool, which writes large steps twice).
    #[arg(long, value_name = "auto|spool", default_value = "auto", value_parser = ["auto", "spool"])]
    pub resume_with: String,
    /// Serve Prometheus metrics on http://ADDR/metrics (per target steps, failures, bytes
    /// and resumes; each sender connection's RTT, window and losses; zfs command
    /// durations). Off by default; e.g. 127.0.0.1:9747.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub transport: crate::TransportArgs,
    #[command(flatten)]
    pub admission: crate::AdmissionArgs,
}

impl ServeArgs {
    /// The transport settings of its endpoints.
    pub fn tuning(&self) -> zq_net::Tuning {
        zq_net::Tuning {
            address_validation: self.admission.address_validation,
            ..self.transport.tuning()
        }
    }
}

/// `--allow FINGERPRINT=ROOT`.
pub fn parse_allow(s: &str) -> Result<(Fingerprint, DatasetName), String> {
    let (fp, root) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected FINGERPRINT=ROOT"))?;
    let fp = Fingerprint::parse(fp)?;
    let root = DatasetName::parse(root).map_err(|e| e.to_string())?;
    Ok((fp, root))
}

/// `PROP=VALUE` of `--force-property` or `--set-property` (checked further by the
/// receiver's policy, or the job's [`zq_repl::props::PropertyPolicy`]).
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    let (prop, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PROP=VALUE, e.g. readonly=on"))?;
    Ok((prop.to_string(), value.to_string()))
}

/// The port zq-recv listens on unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 7446);

/// `serve`'s arguments alone, to parse a config file's receiver as the flags it stands for.
#[derive(clap::Parser, Debug)]
#[command(name = "zq-recv serve", no_binary_name = true)]
pub struct ServeOnly {
    #[command(flatten)]
    pub args: ServeArgs,
}

/// The keys of a config file's receiver and how they parse (`transport` is a table;
/// `allow` is resolved by [`crate::config`]).
pub fn options() -> crate::options::Options {
    crate::options::Options::new(
        <ServeOnly as clap::CommandFactory>::command(),
        &["transport"],
        &["config", "host"],
    )
}
