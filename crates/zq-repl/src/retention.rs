//! Retention of the snapshots zq creates: which ones may go. A pure function, used for the
//! source by the sender and for the destination by the receiver, each with its own
//! [`Policy`].
//!
//! Only snapshots whose name starts with the prefix (`zq_`) are ever candidates; the
//! newest `keep_last` of them stay, and so does what a time [`Grid`] keeps (ages from the
//! time in the name); the common base (the snapshot the receiver last committed, by GUID)
//! and everything newer than it stay, so pruning can never break the incremental chain or
//! remove a snapshot that is not replicated yet. Held snapshots (cursors, other jobs',
//! operators') stay because zfs refuses to destroy them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zq_proto::SnapshotInfo;

/// Prefix of the snapshots zq creates (`zq_<UTC time>`).
pub const ZQ_PREFIX: &str = "zq_";

/// A time grid (`1h=all,24h=hourly,30d=daily`): within each age limit, one snapshot per
/// period (the oldest of each, so the choice stays stable as snapshots age), or `all`;
/// older than the last limit, none. Ages come from the time in zq's snapshot names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// By age limit, ascending.
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    /// Snapshots at most this old fall under the rule (unless an earlier rule took them).
    within: Duration,
    /// One per period, or all when `None`.
    every: Option<Duration>,
}

/// Most rules a grid may have: more would be a mistake, and grids travel to the receiver.
const MAX_RULES: usize = 16;

impl std::str::FromStr for Grid {
    type Err = String;

    fn from_str(s: &str) -> Result<Grid, String> {
        let bad = |why: String| {
            format!("{s:?}: {why} (e.g. 1h=all,24h=hourly,30d=daily: up to an age, all, or one per period)")
        };
        let mut rules: Vec<Rule> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (within, every) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not AGE=PERIOD")))?;
            let within = humantime::parse_duration(within.trim())
                .map_err(|e| bad(format!("age {within:?}: {e}")))?;
            let every = match every.trim() {
                "all" => None,
                "minutely" => Some(Duration::from_secs(60)),
                "hourly" => Some(Duration::from_secs(3600)),
                "daily" => Some(Duration::from_secs(86_400)),
                "weekly" => Some(Duration::from_secs(7 * 86_400)),
                "monthly" => Some(Duration::from_secs(30 * 86_400)),
                "yearly" => Some(Duration::from_secs(365 * 86_400)),
                other => Some(
                    humantime::parse_duration(other)
                        .map_err(|e| bad(format!("period {other:?}: {e}")))?,
                ),
            };
            if every.is_some_and(|p| p.is_zero()) || within.is_zero() {
                return Err(bad(format!("{part:?}: zero")));
            }
            if let Some(prev) = rules.last() {
                if within <= prev.within {
                    return Err(bad(format!("ages must grow from left to right ({part:?})")));
                }
            }
            rules.push(Rule { within, every });
        }
        if rules.is_empty() {
            return Err(bad("no rule".into()));
        }
        if rules.len() > MAX_RULES {
            return Err(bad(format!("more than {MAX_RULES} rules")));
        }
        Ok(Grid { rules })
    }
}

impl std::fmt::Display for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}=", Short(r.within))?;
            match r.every {
                None => f.write_str("all")?,
                Some(p) => write!(f, "{}", Short(p))?,
            }
        }
        Ok(())
    }
}

/// A duration in the largest unit that divides it (`90d`, `36h`, `1500ms`), which
/// `humantime` parses back; its own format says `2months 29days 2h 52m 48s` for 90 days.
struct Short(Duration);

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        for (unit, name) in [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ] {
            if ms.is_multiple_of(unit) {
                return write!(f, "{}{name}", ms / unit);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Grid {
    /// Indexes into `times` (creation times, any order) of the snapshots the grid keeps.
    fn keeps(&self, times: &[(usize, SystemTime)], now: SystemTime) -> HashSet<usize> {
        let mut oldest: HashMap<(usize, u128), (SystemTime, usize)> = HashMap::new();
        let mut kept = HashSet::new();
        for &(i, t) in times {
            let age = now.duration_since(t).unwrap_or_default();
            let Some((r, rule)) = self.rules.iter().enumerate().find(|(_, r)| age <= r.within)
            else {
                continue;
            };
            let Some(every) = rule.every else {
                kept.insert(i);
                continue;
            };
            let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            let bucket = since_epoch.as_millis() / every.as_millis().max(1);
            let e = oldest.entry((r, bucket)).or_insert((t, i));
            if t < e.0 {
                *e = (t, i);
            }
        }
        kept.extend(oldest.into_values().map(|(_, i)| i));
        kept
    }
}

/// What retention keeps of zq's snapshots on one side: the newest N, a time grid, or
/// both (a snapshot either keeps stays). Neither: retention is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: Option<usize>,
    pub grid: Option<Grid>,
}

impl Policy {
    /// Whether the policy destroys anything at all.
    pub fn is_off(&self) -> bool {
        self.keep_last.is_none() && self.grid.is_none()
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.keep_last, &self.grid) {
            (None, None) => f.write_str("keep everything"),
            (Some(n), None) => write!(f, "keep the last {n}"),
            (None, Some(g)) => write!(f, "keep grid {g}"),
            (Some(n), Some(g)) => write!(f, "keep the last {n} and grid {g}"),
        }
    }
}

/// Retention on both sides of a job: the source's policy and the target's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub source: Policy,
    pub target: Policy,
}

impl Retention {
    /// Whether neither side destroys anything.
    pub fn is_off(&self) -> bool {
        self.source.is_off() && self.target.is_off()
    }
}

/// The time in a zq snapshot's name (`zq_2026-09-21T14:13:20.123Z`).
pub fn snapshot_time(name: &str, prefix: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(name.strip_prefix(prefix)?).ok()
}

/// The snapshots of one dataset (oldest first) that `policy` would destroy at `now`: only
/// zq's (names starting with `prefix`), never the base (by GUID) or anything newer, none
/// at all without the base, and none whose name carries no time when a grid decides.
pub fn prunable_by<'a>(
    snapshots: &'a [SnapshotInfo],
    prefix: &str,
    policy: &Policy,
    base_guid: u64,
    now: SystemTime,
) -> Vec<&'a SnapshotInfo> {
    if policy.is_off() {
        return Vec::new();
    }
    let Some(base) = snapshots.iter().position(|s| s.guid == base_guid) else {
        return Vec::new();
    };
    let ours: Vec<usize> = (0..snapshots.len())
        .filter(|&i| snapshots[i].name.starts_with(prefix))
        .collect();
    let mut kept: HashSet<usize> = match policy.keep_last {
        Some(n) => ours[ours.len().saturating_sub(n)..]
            .iter()
            .copied()
            .collect(),
        None => HashSet::new(),
    };
    if let Some(grid) = &policy.grid {
        let mut times = Vec::new();
        for &i in &ours {
            match snapshot_time(&snapshots[i].name, prefix) {
                Some(t) => times.push((i, t)),
                // Cannot be dated: never destroyed by age.
                None => {
                    kept.insert(i);
                }
            }
        }
        kept.extend(grid.keeps(&times, now));
    }
    ours.into_iter()
        .filter(|&i| i < base && !kept.contains(&i))
        .map(|i| &snapshots[i])
        .collect()
}

/// What the sender knows of a target after its last prune: how many `zq_` snapshots it
/// held then, and the GUID of the base (the receiver's last commit) at the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCount {
    /// `zq_` snapshots left on the target by the last prune.
    pub remaining: u32,
    /// The base when it was pruned.
    pub base_guid: u64,
}

/// Whether a prune of the receiver's copy could destroy anything: an upper bound of its
/// `zq_` snapshots — what the last prune left plus the `zq_` snapshots committed since
/// (those after the old base, up to the current one, in the source's `snapshots`) — exceeds
/// `keep_last`. Unknown history (no earlier prune, or either base no longer on the source)
/// says yes. Saves a round trip and a `zfs list` per dataset per pass when retention keeps
/// more than the daemon makes between passes.
pub fn remote_may_exceed(
    last: Option<RemoteCount>,
    snapshots: &[SnapshotInfo],
    prefix: &str,
    keep_last: usize,
    base_guid: u64,
) -> bool {
    let Some(last) = last else {
        return true;
    };
    let at = |guid| snapshots.iter().position(|s| s.guid == guid);
    let (Some(then), Some(now)) = (at(last.base_guid), at(base_guid)) else {
        return true;
    };
    let since = snapshots
        .get(then + 1..=now)
        .unwrap_or_default()
        .iter()
        .filter(|s| s.name.starts_with(prefix))
        .count();
    usize::try_from(last.remaining)
        .unwrap_or(usize::MAX)
        .saturating_add(since)
        > keep_last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::s;
    use proptest::prelude::*;

    fn names<'a>(v: &[&'a SnapshotInfo]) -> Vec<&'a str> {
        v.iter().map(|s| s.name.as_str()).collect()
    }

    fn prunable<'a>(
        snaps: &'a [SnapshotInfo],
        prefix: &str,
        keep: usize,
        base: u64,
    ) -> Vec<&'a SnapshotInfo> {
        let policy = Policy {
            keep_last: Some(keep),
            grid: None,
        };
        prunable_by(snaps, prefix, &policy, base, SystemTime::now())
    }

    fn grid(s: &str) -> Grid {
        s.parse().unwrap()
    }

    /// zq's snapshot `minutes` before `now`.
    fn at(now: SystemTime, minutes: u64, guid: u64) -> SnapshotInfo {
        let t = now - Duration::from_secs(minutes * 60);
        s(&format!("zq_{}", humantime::format_rfc3339_millis(t)), guid)
    }

    #[test]
    fn grids_parse_and_print() {
        let g = grid("1h=all, 24h=hourly,30d=daily");
        assert_eq!(g.to_string(), "1h=all,1d=1h,30d=1d");
        assert_eq!(grid("90d=1500ms").to_string(), "90d=1500ms");
        assert_eq!(grid(&g.to_string()), g);
        assert_eq!(grid("15m=all,2h=10m").to_string(), "15m=all,2h=10m");
        for (bad, says) in [
            ("", "no rule"),
            ("1h", "is not AGE=PERIOD"),
            ("1x=all", "age \"1x\""),
            ("1h=fortnightly", "period \"fortnightly\""),
            ("1d=daily,1h=all", "ages must grow"),
            ("0s=all", "zero"),
        ] {
            let e = bad.parse::<Grid>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_grid_keeps_all_recent_then_one_per_period_then_none() {
        // Aligned to the day (UTC), so that buckets are easy to count.
        let now = UNIX_EPOCH + Duration::from_secs(1_790_000_000 / 86_400 * 86_400);
        // Every 10 minutes for 3 days, oldest first; the newest is the base.
        let snaps: Vec<_> = (0..=3 * 24 * 6)
            .rev()
            .map(|i| at(now, i * 10, 10_000 - i))
            .collect();
        let base = snaps.last().unwrap().guid;
        let policy = Policy {
            keep_last: None,
            grid: Some(grid("1h=all,24h=hourly,2d=daily")),
        };
        let gone = prunable_by(&snaps, ZQ_PREFIX, &policy, base, now);
        let kept: Vec<_> = snaps
            .iter()
            .filter(|s| !gone.iter().any(|g| g.guid == s.guid))
            .map(|s| {
                now.duration_since(snapshot_time(&s.name, ZQ_PREFIX).unwrap())
                    .unwrap()
            })
            .collect();
        let hour = Duration::from_secs(3600);
        // The last hour whole (7 at 0..=60 minutes), one per hour up to a day, one per day
        // up to two days, nothing older.
        assert_eq!(kept.iter().filter(|a| **a <= hour).count(), 7);
        assert_eq!(
            kept.iter()
                .filter(|a| **a > hour && **a <= 24 * hour)
                .count(),
            23
        );
        assert_eq!(
            kept.iter()
                .filter(|a| **a > 24 * hour && **a <= 48 * hour)
                .count(),
            1
        );
        assert!(kept.iter().all(|a| *a <= 48 * hour));
        // With keep_last too, either keeps.
        let both = Policy {
            keep_last: Some(200),
            grid: policy.grid.clone(),
        };
        let fewer = prunable_by(&snaps, ZQ_PREFIX, &both, base, now);
        assert_eq!(snaps.len() - fewer.len(), 200 + 1);
    }

    #[test]
    fn a_grid_never_touches_undated_foreign_or_unreplicated_snapshots() {
        let now = SystemTime::now();
        let snaps = [
            at(now, 600, 1),
            s("zq_not-a-time", 2),
            s("daily-2020", 3),
            at(now, 500, 4),
            at(now, 400, 5),
            at(now, 300, 6),
        ];
        let policy = Policy {
            keep_last: None,
            grid: Some(grid("1h=all")),
        };
        // The base is the 500-minute one: the two after it stay whatever their age.
        let gone = prunable_by(&snaps, ZQ_PREFIX, &policy, 4, now);
        assert_eq!(gone.iter().map(|s| s.guid).collect::<Vec<_>>(), [1]);
        assert!(prunable_by(&snaps, ZQ_PREFIX, &Policy::default(), 6, now).is_empty());
    }

    #[test]
    fn keeps_newest_and_foreign_snapshots() {
        let snaps = [
            s("zq_1", 1),
            s("daily", 2),
            s("zq_2", 3),
            s("zq_3", 4),
            s("zq_4", 5),
        ];
        assert_eq!(names(&prunable(&snaps, ZQ_PREFIX, 2, 5)), ["zq_1", "zq_2"]);
        assert!(prunable(&snaps, ZQ_PREFIX, 10, 5).is_empty());
    }

    #[test]
    fn never_the_base_or_newer() {
        let snaps = [s("zq_1", 1), s("zq_2", 2), s("zq_3", 3), s("zq_4", 4)];
        // The base is zq_2: zq_2..zq_4 stay even with keep_last 0.
        assert_eq!(names(&prunable(&snaps, ZQ_PREFIX, 0, 2)), ["zq_1"]);
        // Unknown base: nothing goes.
        assert!(prunable(&snaps, ZQ_PREFIX, 0, 99).is_empty());
    }

    #[test]
    fn a_remote_prune_is_skipped_only_when_it_cannot_destroy_anything() {
        let snaps = [s("zq_1", 1), s("daily", 2), s("zq_2", 3), s("zq_3", 4)];
        let last = |remaining, base_guid| {
            Some(RemoteCount {
                remaining,
                base_guid,
            })
        };
        // Never pruned: ask.
        assert!(remote_may_exceed(None, &snaps, ZQ_PREFIX, 100, 4));
        // 2 left at zq_1, then zq_2 and zq_3 committed (daily is not ours): at most 4.
        assert!(!remote_may_exceed(last(2, 1), &snaps, ZQ_PREFIX, 4, 4));
        assert!(remote_may_exceed(last(2, 1), &snaps, ZQ_PREFIX, 3, 4));
        // Nothing committed since.
        assert!(!remote_may_exceed(last(3, 4), &snaps, ZQ_PREFIX, 3, 4));
        // The old base is gone from the source: unknown, ask.
        assert!(remote_may_exceed(last(0, 99), &snaps, ZQ_PREFIX, 100, 4));
        // A base older than the last one (the receiver was rolled back): count nothing new.
        assert!(!remote_may_exceed(last(1, 4), &snaps, ZQ_PREFIX, 1, 1));
    }

    proptest! {
        #[test]
        fn invariants(
            kinds in proptest::collection::vec(any::<bool>(), 0..30),
            keep in 0usize..10,
            base_pick in any::<proptest::sample::Index>(),
        ) {
            let snaps: Vec<_> = kinds
                .iter()
                .enumerate()
                .map(|(i, zq)| s(&format!("{}{i}", if *zq { "zq_" } else { "x" }), i as u64 + 1))
                .collect();
            let base = if snaps.is_empty() { 0 } else { snaps[base_pick.index(snaps.len())].guid };
            let gone = prunable(&snaps, ZQ_PREFIX, keep, base);
            let ours = snaps.iter().filter(|s| s.name.starts_with(ZQ_PREFIX)).count();
            for g in &gone {
                prop_assert!(g.name.starts_with(ZQ_PREFIX));
                prop_assert!(g.guid < base, "base or newer pruned");
            }
            prop_assert!(ours - gone.len() >= keep.min(ours));
        }

        /// A grid pass is stable: what it leaves, a second pass at the same time leaves
        /// alone (it keeps the oldest of each period, which stays the oldest).
        #[test]
        fn a_grid_pass_is_idempotent(
            gaps in proptest::collection::vec(1u64..600, 1..80),
            keep in proptest::option::of(0usize..5),
            rules in prop_oneof![
                Just("1h=all,24h=hourly,30d=daily"),
                Just("10m=all,2h=15m,1d=2h"),
                Just("1d=hourly"),
            ],
        ) {
            let now = SystemTime::now();
            let mut minutes: Vec<u64> = gaps.iter().scan(0, |t, g| { *t += g; Some(*t) }).collect();
            minutes.reverse();
            let snaps: Vec<_> = minutes.iter().enumerate().map(|(i, m)| at(now, *m, i as u64 + 1)).collect();
            let base = snaps.last().unwrap().guid;
            let policy = Policy { keep_last: keep, grid: Some(grid(rules)) };
            let gone: HashSet<u64> = prunable_by(&snaps, ZQ_PREFIX, &policy, base, now)
                .iter().map(|s| s.guid).collect();
            let left: Vec<_> = snaps.iter().filter(|s| !gone.contains(&s.guid)).cloned().collect();
            prop_assert!(left.iter().any(|s| s.guid == base));
            prop_assert!(prunable_by(&left, ZQ_PREFIX, &policy, base, now).is_empty());
        }
    }
}
