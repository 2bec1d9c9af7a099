//! Property replication: what a step asks of the receiver's `zfs receive`, and what the
//! receiver makes of it (protocol version 8, [`zq_proto::StepProperties`]).
//!
//! - The sender's job may carry the source dataset's properties in the stream
//!   (`--send-properties`: `zfs send -p`) and ask for `zfs receive -o PROP=VALUE`
//!   (`--recv-set-property`) and `-x PROP` (`--recv-exclude-property`) on every step.
//! - The receiver checks every name and value (they come from the network), and:
//!   - never applies the source's [`NEVER_FROM_SOURCE`] (`mountpoint`, `canmount`,
//!     `sharenfs`, `sharesmb`): they are excluded whenever the stream carries properties,
//!     so a replica never mounts over the backup host's own paths or shares itself;
//!   - refuses a request to set those or any [`ENCRYPTION`] property, or to exclude an
//!     encryption property (zfs refuses that for raw streams, and a plain stream carries
//!     none: zfs will not `send -p` an encrypted dataset without `-w`);
//!   - adds what it excludes itself (`zq-recv --exclude-property`) and what it forces
//!     (`--force-property`), which wins over whatever the sender asks.
//! - A raw stream with properties carries the source's `keylocation`, which zfs applies
//!   even with `-x keylocation` (OpenZFS 2.3, measured in the test guest); the receiver
//!   sets `keylocation=prompt` on the encryption root after such a receive instead.

use zq_proto::StepProperties;

/// Properties of the source a receiver never applies: excluded (`zfs receive -x`) from
/// every stream that carries properties, and never set at a sender's request.
pub const NEVER_FROM_SOURCE: [&str; 4] = ["mountpoint", "canmount", "sharenfs", "sharesmb"];

/// Encryption properties: zfs takes none of them on the command line of a raw receive,
/// and a plain stream is encrypted as the destination's parent is.
pub const ENCRYPTION: [&str; 5] = [
    "encryption",
    "keyformat",
    "keylocation",
    "pbkdf2iters",
    "pbkdf2salt",
];

/// Checks a property name: a native property's or a user property's (`module:name`) as
/// far as its characters go; zfs judges the rest when it receives.
pub fn check_name(prop: &str) -> Result<(), String> {
    let ok = prop.starts_with(|c: char| c.is_ascii_lowercase())
        && prop.len() <= 256
        && prop
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{prop:?} is not a property name (a lower-case letter, then lower-case letters, \
             digits, '_', '-', '.', ':'; e.g. readonly, or com.example:backup)"
        ))
    }
}

/// Checks a value to set: 1 to 1024 characters, none of them control characters.
pub fn check_value(prop: &str, value: &str) -> Result<(), String> {
    if value.is_empty()
        || value.len() > zq_proto::limits::MAX_PROPERTY_VALUE_LEN
        || value.chars().any(char::is_control)
    {
        return Err(format!(
            "the value of {prop} must be 1 to 1024 characters without control characters"
        ));
    }
    Ok(())
}

/// Why `prop` may not be set at a sender's request, if it may not.
fn not_settable(prop: &str) -> Option<&'static str> {
    if NEVER_FROM_SOURCE.contains(&prop) {
        Some("a sender never sets where or whether a replica mounts or is shared (the receiver may force it: zq-recv --force-property)")
    } else if ENCRYPTION.contains(&prop) {
        Some("zfs takes no encryption property for raw streams, and a plain stream is encrypted as the destination's parent is")
    } else {
        None
    }
}

/// A sender job's property choices (`--send-properties`, `--recv-set-property`,
/// `--recv-exclude-property`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyPolicy {
    /// `zfs send -p`.
    pub send: bool,
    /// `zfs receive -o PROP=VALUE` asked of the receiver.
    pub set: Vec<(String, String)>,
    /// `zfs receive -x PROP` asked of the receiver.
    pub exclude: Vec<String>,
}

impl PropertyPolicy {
    /// Checks the choices as the receiver will (an error names the option and what to
    /// change).
    pub fn new(
        send: bool,
        set: Vec<(String, String)>,
        exclude: Vec<String>,
    ) -> Result<Self, String> {
        let limit = zq_proto::limits::MAX_STEP_PROPERTIES;
        if set.len() > limit || exclude.len() > limit {
            return Err(format!(
                "at most {limit} properties to set, and {limit} to exclude"
            ));
        }
        for (i, (p, v)) in set.iter().enumerate() {
            check_name(p).map_err(|e| format!("--recv-set-property: {e}"))?;
            check_value(p, v).map_err(|e| format!("--recv-set-property: {e}"))?;
            if let Some(why) = not_settable(p) {
                return Err(format!("--recv-set-property: {p} cannot be set: {why}"));
            }
            if set[..i].iter().any(|(q, _)| q == p) {
                return Err(format!("--recv-set-property: {p} is set twice"));
            }
        }
        for p in &exclude {
            check_name(p).map_err(|e| format!("--recv-exclude-property: {e}"))?;
            if ENCRYPTION.contains(&p.as_str()) {
                return Err(format!(
                    "--recv-exclude-property: {p} cannot be excluded: zfs refuses that for raw \
                     streams, and the receiver never applies a source's key location anyway"
                ));
            }
            if set.iter().any(|(q, _)| q == p) {
                return Err(format!("{p} is both set and excluded: choose one"));
            }
        }
        Ok(PropertyPolicy { send, set, exclude })
    }

    /// What a step asks: `carried` if its stream is `zfs send -p` (not for an encrypted
    /// dataset sent decrypted, which zfs refuses).
    pub fn request(&self, carried: bool) -> StepProperties {
        StepProperties {
            carried,
            set: self.set.clone(),
            exclude: self.exclude.clone(),
        }
    }

    /// Whether a step asks anything of the receiver's properties at all.
    pub fn is_empty(&self) -> bool {
        !self.send && self.set.is_empty() && self.exclude.is_empty()
    }
}

/// What `zfs receive` gets: `-o` and `-x`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveProperties {
    /// `-o PROP=VALUE`.
    pub set: Vec<(String, String)>,
    /// `-x PROP`.
    pub exclude: Vec<String>,
}

/// The receiver's side: what a step's `zfs receive` sets and excludes, from what the
/// receiver forces (`forced`) and excludes (`excluded`) and what the sender asked
/// (`asked`). [`NEVER_FROM_SOURCE`] is excluded whenever the stream may carry properties:
/// when the sender says so, and for any compound stream (`compound`: a `-I` step), since
/// a compound stream's header can carry properties whatever the sender says. A request
/// the receiver refuses is an error naming it.
pub fn receive_properties(
    forced: &[(String, String)],
    excluded: &[String],
    asked: &StepProperties,
    compound: bool,
) -> Result<ReceiveProperties, String> {
    let mut set: Vec<(String, String)> = forced.to_vec();
    for (p, v) in &asked.set {
        check_name(p)?;
        check_value(p, v)?;
        if let Some(why) = not_settable(p) {
            return Err(format!(
                "the sender asks to set {p}, which it may not: {why}"
            ));
        }
        if asked.exclude.contains(p) {
            return Err(format!("the sender asks to both set and exclude {p}"));
        }
        // What the receiver forces wins.
        if !set.iter().any(|(q, _)| q == p) {
            set.push((p.clone(), v.clone()));
        }
    }
    let mut exclude: Vec<String> = Vec::new();
    let never = NEVER_FROM_SOURCE
        .iter()
        .map(|p| p.to_string())
        .filter(|_| asked.carried || compound);
    for p in asked
        .exclude
        .iter()
        .cloned()
        .chain(excluded.iter().cloned())
        .chain(never)
    {
        check_name(&p)?;
        if ENCRYPTION.contains(&p.as_str()) {
            return Err(format!(
                "the sender asks to exclude {p}: zfs takes no encryption property on a raw \
                 receive's command line"
            ));
        }
        if !exclude.contains(&p) && !set.iter().any(|(q, _)| *q == p) {
            exclude.push(p);
        }
    }
    Ok(ReceiveProperties { set, exclude })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(p, v)| (p.to_string(), v.to_string()))
            .collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stream_with_properties_never_brings_mounts_or_shares() {
        let asked = StepProperties {
            carried: true,
            ..Default::default()
        };
        let r = receive_properties(&[], &[], &asked, false).unwrap();
        assert_eq!(r.exclude, NEVER_FROM_SOURCE);
        assert!(r.set.is_empty());
        // A compound stream (-I) may carry them whatever the sender says.
        let r = receive_properties(&[], &[], &StepProperties::default(), true).unwrap();
        assert_eq!(r.exclude, NEVER_FROM_SOURCE);
        // Without properties in the stream there is nothing to exclude.
        let r = receive_properties(&[], &[], &StepProperties::default(), false).unwrap();
        assert_eq!(r, ReceiveProperties::default());
    }

    #[test]
    fn the_receiver_forces_over_what_the_sender_asks() {
        let asked = StepProperties {
            carried: true,
            set: pairs(&[("readonly", "off"), ("com.example:x", "1")]),
            exclude: strings(&["atime"]),
        };
        let forced = pairs(&[("readonly", "on"), ("mountpoint", "none")]);
        let r = receive_properties(&forced, &strings(&["compression"]), &asked, false).unwrap();
        assert_eq!(
            r.set,
            pairs(&[
                ("readonly", "on"),
                ("mountpoint", "none"),
                ("com.example:x", "1")
            ])
        );
        // mountpoint is forced, so not excluded; the rest of the defaults are.
        assert_eq!(
            r.exclude,
            strings(&["atime", "compression", "canmount", "sharenfs", "sharesmb"])
        );
    }

    #[test]
    fn hostile_or_impossible_requests_are_refused() {
        let ask = |set: &[(&str, &str)], exclude: &[&str]| StepProperties {
            carried: false,
            set: pairs(set),
            exclude: strings(exclude),
        };
        for bad in [
            ask(&[("mountpoint", "/etc")], &[]),
            ask(&[("sharenfs", "on")], &[]),
            ask(&[("keylocation", "file:///x")], &[]),
            ask(&[("Readonly", "on")], &[]),
            ask(&[("readonly", "")], &[]),
            ask(&[("readonly", "on\n")], &[]),
            ask(&[("readonly", "on")], &["readonly"]),
            ask(&[], &["keyformat"]),
            ask(&[], &["-o"]),
            ask(&[], &["a b"]),
        ] {
            assert!(
                receive_properties(&[], &[], &bad, false).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_sender_job_is_checked_as_the_receiver_will() {
        let ok = PropertyPolicy::new(true, pairs(&[("com.example:a", "b")]), strings(&["atime"]))
            .unwrap();
        assert_eq!(ok.request(true).exclude, ["atime"]);
        assert!(!ok.is_empty());
        assert!(PropertyPolicy::default().is_empty());
        for (set, exclude) in [
            (pairs(&[("canmount", "on")]), vec![]),
            (pairs(&[("a:b", "1"), ("a:b", "2")]), vec![]),
            (vec![], strings(&["keylocation"])),
            (pairs(&[("atime", "on")]), strings(&["atime"])),
        ] {
            assert!(PropertyPolicy::new(false, set, exclude).is_err());
        }
    }
}
