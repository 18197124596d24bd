"""The table `wan-tune prep` ends with: clips per bucket, skips by reason, shard sizes, stage times."""

from __future__ import annotations

import re
from collections import Counter


def reason_kind(reason: str) -> str:
    """'too short: 0.40 s gives ...' -> 'too short' (the part before details); a manifest row's
    number and the figures of a sentence are left out so that rows with the same fault count together."""
    reason = re.sub(r"^manifest row \d+: ", "", reason)
    return re.sub(r"-?\d+(\.\d+)?", "N", re.split(r"[:(]", reason, maxsplit=1)[0]).strip()


def format_summary(summary: dict) -> str:
    lines = [f"prep summary: {summary['root']}", "", f"  {'bucket (frames x h x w)':<28}{'clips':>8}"]
    for bucket, n in sorted(summary["buckets"].items(), key=lambda kv: [int(x) for x in kv[0].split("x")]):
        lines.append(f"  {bucket:<28}{n:>8}")
    lines.append(f"  {'total':<28}{summary['samples']:>8}")
    by_source = summary.get("by_source", {})
    if len(by_source) > 1:  # data.sources: what each gave
        lines += ["", f"  {'source':<28}{'samples':>8}{'files':>8}{'skipped':>9}"]
        lines += [f"  {name:<28}{row['samples']:>8}{row['clips']:>8}{row['skipped']:>9}" for name, row in by_source.items()]
    skips = summary["skips"]
    lines += ["", f"  skipped inputs: {len(skips)}" + (" (one line each in prep_report.csv)" if skips else "")]
    for kind, n in Counter(reason_kind(r) for _, r in skips).most_common():
        lines.append(f"    {kind:<40}{n:>6}")
    if summary.get("stale"):
        lines.append(f"  left out of the index: {summary['stale']} sample(s) encoded under earlier settings or captions")
    lines += ["", f"  shard files: {summary['files']}, {summary['bytes'] / 2**20:.1f} MiB"]
    secs = summary["seconds"]
    lines.append("  time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items() if v >= 0.05))
    return "\n".join(lines)
