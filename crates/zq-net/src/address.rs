//! `HOST:PORT` as the command line and config files give it: checked when parsed, so that
//! a missing port is a usage error, not a failed connection.

use std::net::SocketAddr;

use crate::endpoint::NetError;

/// A peer's address as given: a host name, IPv4 or `[IPv6]` address, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    text: String,
    port: u16,
}

impl HostPort {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as given (names are resolved by [`HostPort::resolve`]).
    pub fn host(&self) -> &str {
        let host = &self.text[..self.text.len() - self.port_len()];
        host.trim_start_matches('[').trim_end_matches(']')
    }

    fn port_len(&self) -> usize {
        self.text.len() - self.text.rfind(':').unwrap_or(0)
    }

    /// The first address the host resolves to.
    pub async fn resolve(&self) -> Result<SocketAddr, NetError> {
        crate::endpoint::resolve(&self.text).await
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let expected =
            "expected HOST:PORT (e.g. backup.example:7446, 192.0.2.7:7446 or [2001:db8::7]:7446)";
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(HostPort {
                text: addr.to_string(),
                port: addr.port(),
            });
        }
        // `[::1]`: a bracketed address, no port.
        let bracketed_only = s.starts_with('[') && s.ends_with(']');
        let Some((host, port)) = s.rsplit_once(':').filter(|_| !bracketed_only) else {
            return Err(format!("{s:?} has no port: {expected}"));
        };
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(format!(
                "{s:?}: an IPv6 address goes in brackets before the port: {expected}"
            ));
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty() || bare.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("{s:?} has no valid host: {expected}"));
        }
        let port = port.parse::<u16>().map_err(|_| {
            format!("{s:?}: {port:?} is not a port number (0 to 65535): {expected}")
        })?;
        Ok(HostPort {
            text: s.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::HostPort;

    #[test]
    fn addresses_need_a_host_and_a_port() {
        for (good, host, port) in [
            ("backup.example:7446", "backup.example", 7446),
            ("127.0.0.1:0", "127.0.0.1", 0),
            ("[::1]:7446", "::1", 7446),
            ("[::]:7446", "::", 7446),
            ("localhost:65535", "localhost", 65535),
        ] {
            let a: HostPort = good.parse().unwrap();
            assert_eq!((a.host(), a.port()), (host, port), "{good}");
        }
        for (bad, says) in [
            ("backup.example", "has no port"),
            ("127.0.0.1", "has no port"),
            ("[::1]", "has no port"),
            ("::1:7446", "in brackets"),
            (":7446", "no valid host"),
            ("backup:port", "not a port number"),
            ("backup:70000", "not a port number"),
            ("a b:1", "no valid host"),
        ] {
            let e = bad.parse::<HostPort>().unwrap_err();
            assert!(e.contains(says) && e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
