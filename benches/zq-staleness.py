#!/usr/bin/env python3
"""zq's staleness from its JSON logs, for the harnesses in benches/.

    zq-staleness.py SEND_LOG RECV_LOG SRC_PREFIX DST_PREFIX N CHILD...

Prints "LABEL N STALENESS_NS" per counted snapshot of each CHILD (a dataset name under
SRC_PREFIX): from the snapshot loop's "snapshot created" (after `zfs snapshot` returned) to
the receiver's "zfs receive finished". LABEL is $ZQ_LABEL (default "zq"). With
$ZQ_WINDOW_NS="FROM UNTIL" only snapshots made in [FROM, UNTIL) count. With $ZQ_DRAIN_NS=T
it prints instead "LABEL N DRAIN_NS": how long after T every CHILD had received the last
snapshot made before T. With $ZQ_PARTS=1 it prints where the counted snapshots' staleness
went (before the receiver had the step, header to first bytes, `zfs receive`), from the
receiver's debug timings. A start-up line goes to stderr.
"""
import os
import json, sys, datetime
send_log, recv_log, src, dst, n, children = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], set(sys.argv[6:])
def ts(s):
    d = datetime.datetime.strptime(s[:26].rstrip('Z'), "%Y-%m-%dT%H:%M:%S.%f")
    return int(d.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6) * 1000
made = {}
for line in open(send_log):
    try: r = json.loads(line)
    except ValueError: continue
    f = r.get("fields", {})
    if f.get("message") == "snapshot created":
        made[f["snapshot"].split("@", 1)[1]] = ts(r["timestamp"])
rows = []
for line in open(recv_log):
    try: r = json.loads(line)
    except ValueError: continue
    if r.get("fields", {}).get("message") != "zfs receive finished": continue
    step = next((s for s in r.get("spans", []) if s.get("name") == "step"), None)
    if not step or not step["target"].startswith(dst): continue
    ds = step["target"][len(dst):]
    if ds in children and step["to"] in made:
        f = r["fields"]
        rows.append((ds, step["to"], ts(r["timestamp"]),
                     (f.get("total_ms", 0), f.get("first_bytes_ms", 0), f.get("receive_ms", 0))))
# Steady state only: the daemon's start-up (listing both sides in full and planning every
# dataset: seconds at 100 datasets on zfs-fuse, where the floor starts from a known base)
# and the snapshots it let queue up are reported, not counted. Start-up ends when every
# dataset received its first snapshot; its backlog (snapshots made until then) is gone
# when every dataset received the last of them. Counted are snapshots made after that,
# and never the first two.
def done_at(snap):  # when every dataset had `snap` (or a later one), None if never
    ts_ = [min((t for d, to, t, _ in rows if d == ds and made[to] >= made[snap]), default=None)
           for ds in children]
    return None if None in ts_ else max(ts_)
drain = os.environ.get("ZQ_DRAIN_NS")
if drain:
    t = int(drain)
    last = max((m for m in made if made[m] < t), key=made.get)
    at = done_at(last)
    print(os.environ.get("ZQ_LABEL", "zq"), n, -1 if at is None else max(0, at - t))
    sys.exit(0)
start = min(made.values())
snaps = sorted(made, key=made.get)
up = done_at(snaps[0])
backlog = [m for m in snaps if up is not None and made[m] <= up]
drained = done_at(backlog[-1]) if backlog else None
order = [m for m in snaps[2:] if drained is not None and made[m] > drained]
window = os.environ.get("ZQ_WINDOW_NS")
if window:
    lo, hi = (int(x) for x in window.split())
    order = [m for m in order if lo <= made[m] < hi]
label = os.environ.get("ZQ_LABEL", "zq")
print(f"zq start-up ({n} datasets): every dataset had a snapshot {((up or start) - start) / 1e6:.0f} ms "
      f"after the first was made, the {len(backlog)} made until then {((drained or start) - start) / 1e6:.0f} ms "
      f"after; {len(made) - len(order)} of {len(made)} snapshots not counted", file=sys.stderr)
if os.environ.get("ZQ_PARTS"):
    # Where the counted snapshots' staleness went: before their step reached the receiver
    # (queued behind the dataset's previous step or a slot, zfs send starting), from the
    # header to the stream's first bytes, and `zfs receive` itself.
    parts = [((t - made[to]) / 1e6 - tot, fb, rc) for ds, to, t, (tot, fb, rc) in rows if to in order]
    def pc(v, q):
        v = sorted(v); return v[min(len(v) - 1, int(round((len(v) - 1) * q)))] if v else float("nan")
    for i, name in enumerate(("before the receiver had the step", "header to first bytes", "zfs receive")):
        v = [p[i] for p in parts]
        print(f"{label}: {name}: p50 {pc(v, .5):.0f} ms, p90 {pc(v, .9):.0f} ms")
    sys.exit(0)
for ds, to, t, _ in rows:
    if to in order:
        print(label, n, t - made[to])
