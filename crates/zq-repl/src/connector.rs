//! How a sender reaches its receiver: dial it (one client endpoint for every reconnection,
//! so TLS sessions resume in 0-RTT) or, in pull mode, wait for it to dial in; then the
//! handshake, and with `connections > 1` the stripe connections. One-shot runs and the
//! daemon both connect through a [`Connector`].

use std::net::SocketAddr;
use std::time::Duration;

use zq_net::{Client, Fingerprint, HostPort, Identity, NetError, Tuning};
use zq_proto::Capabilities;
use zq_store::Zfs;

use crate::error::ReplError;
use crate::sender::{Sender, SenderConfig};

/// How long a pull-mode daemon waits for the receiver per attempt: short enough that it
/// writes its status and sees SIGTERM meanwhile.
const PULL_WAIT: Duration = Duration::from_secs(2);

/// Where the receiver is and how to reach it.
#[derive(Debug)]
pub struct ConnectConfig {
    /// This sender's key.
    pub identity: Identity,
    /// The receiver's key, pinned.
    pub peer: Fingerprint,
    /// The receiver's address, or in pull mode where to listen.
    pub addr: HostPort,
    /// Pull mode (`zq-send serve`): listen on `addr` and let the receiver dial in.
    pub listen: bool,
    /// A daemon: in pull mode, each attempt waits 2 s (`PULL_WAIT`) for the receiver, not
    /// forever.
    pub daemon: bool,
    /// QUIC windows, congestion control, socket buffers, idle timeout.
    pub tuning: Tuning,
    /// Connections per sender: bulk steps stripe their chunks over them (1 to 16).
    pub connections: u8,
    /// Speak only this protocol version (compatibility tests).
    pub protocol_version: Option<u16>,
    /// This program and version, for the receiver's logs.
    pub software: String,
    /// How each connection's [`Sender`] sends.
    pub sender: SenderConfig,
}

/// Connecting to the receiver failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint could not be set up (socket, TLS configuration).
    #[error("setting up the connection to receiver {receiver}")]
    Setup {
        /// The receiver.
        receiver: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// What was asked cannot work (a usage error).
    #[error("{0}")]
    Invalid(String),
    /// Dialing the receiver failed.
    #[error("connecting to receiver {receiver}")]
    Dial {
        /// The receiver.
        receiver: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// Pull mode: the receiver has not dialed in (yet).
    #[error("the receiver {receiver} has not connected to {listen} yet")]
    NotConnected {
        /// The receiver.
        receiver: String,
        /// Where this sender listens.
        listen: SocketAddr,
    },
    /// The receiver closed the connection with a TLS alert: it does not know our key.
    #[error(
        "receiver {receiver} refused this sender's key {ours}: on the receiver, allow it with \
         --allow {ours}=ROOT"
    )]
    KeyRefused {
        /// The receiver.
        receiver: String,
        /// This sender's key.
        ours: Fingerprint,
    },
    /// The handshake failed (refused, versions, a lost connection).
    #[error("handshake with receiver {receiver}")]
    Handshake {
        /// The receiver.
        receiver: String,
        /// Why.
        #[source]
        source: ReplError,
    },
}

impl ConnectError {
    /// Whether trying again later, with nothing changed by a human, can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ConnectError::Dial { source, .. } => source.retryable(),
            ConnectError::NotConnected { .. } => true,
            ConnectError::Handshake { source, .. } => source.retryable(),
            ConnectError::Setup { .. }
            | ConnectError::Invalid(_)
            | ConnectError::KeyRefused { .. } => false,
        }
    }

    /// Whether the command line or configuration asked for something impossible.
    pub fn is_usage(&self) -> bool {
        matches!(self, ConnectError::Invalid(_))
    }
}

/// Whether `connections` per sender can be made: in pull mode the receiver makes the one
/// connection. [`Connector::new`] checks it; callers can before loading anything.
pub fn check_connections(connections: u8, listen: bool) -> Result<(), ConnectError> {
    if listen && connections > 1 {
        return Err(ConnectError::Invalid(format!(
            "--connections {connections} needs zq-send to dial the receiver; in pull mode \
             (serve) the receiver makes the one connection"
        )));
    }
    Ok(())
}

/// How the sender reaches its receiver.
#[derive(Debug)]
enum Link {
    /// It dials: one client endpoint reused for every (re)connection, so TLS sessions can
    /// be resumed.
    Dial { client: Client, addr: SocketAddr },
    /// Pull mode: the receiver dials in. A daemon waits up to `wait` per attempt; a
    /// one-shot run as long as it takes.
    Listen {
        listener: zq_net::Listener,
        wait: Option<Duration>,
    },
}

/// Makes handshaken [`Sender`]s to one receiver, as often as asked.
#[derive(Debug)]
pub struct Connector {
    link: Link,
    /// The receiver, for messages: its address, or `(pull) <key>`.
    name: String,
    ours: Fingerprint,
    caps: Capabilities,
    sender: SenderConfig,
    connections: u8,
    zfs: Zfs,
}

impl Connector {
    /// Resolves the address and sets up the endpoint (binds it in pull mode); connects
    /// nothing yet.
    pub async fn new(config: ConnectConfig, zfs: Zfs) -> Result<Self, ConnectError> {
        let receiver = match config.listen {
            true => format!("(pull) {}", config.peer.short()),
            false => config.addr.to_string(),
        };
        check_connections(config.connections, config.listen)?;
        let addr = config
            .addr
            .resolve()
            .await
            .map_err(|source| ConnectError::Dial {
                receiver: receiver.clone(),
                source,
            })?;
        let setup = |source| ConnectError::Setup {
            receiver: receiver.clone(),
            source,
        };
        let ours = config.identity.fingerprint;
        let tuning = config.tuning.shared_by(config.connections);
        let link = if config.listen {
            let listener = zq_net::Listener::bind(config.identity, config.peer, addr, &tuning)
                .map_err(setup)?;
            tracing::info!(bound = %listener.local_addr(), receiver = %config.peer.short(), "waiting for the receiver to connect (pull mode)");
            Link::Listen {
                listener,
                wait: config.daemon.then_some(PULL_WAIT),
            }
        } else {
            let client = Client::new(config.identity, config.peer, addr, &tuning).map_err(setup)?;
            Link::Dial { client, addr }
        };
        Ok(Connector {
            link,
            name: receiver,
            ours,
            caps: config.sender.capabilities(
                config.software,
                config.protocol_version,
                zfs.capabilities().resumable_receive,
            ),
            sender: config.sender,
            connections: config.connections,
            zfs,
        })
    }

    /// Pull mode: the address it listens on (the port chosen, for port 0).
    pub fn listening_on(&self) -> Option<SocketAddr> {
        match &self.link {
            Link::Listen { listener, .. } => Some(listener.local_addr()),
            Link::Dial { .. } => None,
        }
    }

    /// How each connection's sender sends.
    pub fn sender_config(&self) -> &SenderConfig {
        &self.sender
    }

    /// The local zfs the senders run.
    pub fn zfs(&self) -> &Zfs {
        &self.zfs
    }

    /// Connects (or, in pull mode, takes the receiver's connection) and runs the
    /// handshake; with `connections > 1` also opens the stripe connections.
    pub async fn connect(&self) -> Result<Sender, ConnectError> {
        let receiver = || self.name.clone();
        let dialed = match &self.link {
            Link::Dial { client, addr } => {
                client
                    .dial(*addr)
                    .await
                    .map_err(|source| ConnectError::Dial {
                        receiver: receiver(),
                        source,
                    })?
            }
            Link::Listen { listener, wait } => listener
                .next(*wait)
                .await
                .ok_or_else(|| ConnectError::NotConnected {
                    receiver: receiver(),
                    listen: listener.local_addr(),
                })?
                .into(),
        };
        let conn = dialed.conn.clone();
        let sender = match Sender::handshake(
            dialed,
            self.zfs.clone(),
            &self.caps,
            self.sender.clone(),
        )
        .await
        {
            Ok(s) => s,
            Err(_) if zq_net::closed_by_tls_alert(&conn) => {
                return Err(ConnectError::KeyRefused {
                    receiver: receiver(),
                    ours: self.ours,
                })
            }
            Err(source) => {
                return Err(ConnectError::Handshake {
                    receiver: receiver(),
                    source,
                })
            }
        };
        let version = sender.session().version;
        if self.connections > 1 && version >= 5 {
            return Ok(sender.with_stripes(self.stripe_connections().await));
        }
        if self.connections > 1 {
            tracing::warn!(
                version,
                "the receiver speaks protocol version {version} (< 5): one connection, not {}, \
                 with its share of the send window; drop --connections for it",
                self.connections
            );
        }
        Ok(sender)
    }

    /// `connections - 1` more handshaken connections to the receiver, dialed at once. One
    /// that fails is left out (with a warning): the step's own connection carries on.
    async fn stripe_connections(&self) -> Vec<quinn::Connection> {
        let Link::Dial { client, addr } = &self.link else {
            return Vec::new();
        };
        let mut dials = tokio::task::JoinSet::new();
        for _ in 1..self.connections {
            let (client, addr, zfs, caps) =
                (client.clone(), *addr, self.zfs.clone(), self.caps.clone());
            let config = self.sender.clone();
            dials.spawn(async move {
                let dialed = client.dial(addr).await.map_err(ReplError::Net)?;
                Ok::<_, ReplError>(
                    Sender::handshake(dialed, zfs, &caps, config)
                        .await?
                        .into_connection(),
                )
            });
        }
        let mut conns = Vec::new();
        while let Some(r) = dials.join_next().await {
            match r {
                Ok(Ok(conn)) => conns.push(conn),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot open a parallel connection"),
                Err(e) => tracing::warn!(error = %e, "cannot open a parallel connection"),
            }
        }
        conns
    }

    /// Lets the last cursor moves happen, then closes the endpoint so the receiver learns
    /// of it at once.
    pub async fn shutdown(&self) {
        if let Some(p) = &self.sender.protector {
            p.flush().await;
        }
        match &self.link {
            Link::Dial { client, .. } => client.shutdown().await,
            Link::Listen { listener, .. } => listener.shutdown().await,
        }
    }
}
