"""`otacoap status`: where the fleet stands at a glance (issue 12 §1).

Per class: its devices, the release it is served and how many devices last reported
each state; per release still being handed out: how many devices run it; per active
campaign: its state and its members per wave. Everything from the store, in one short
read (active campaigns are evaluated first, as `campaign show` does, so the figures are
current even without a running server).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from typing import Any

from .output import json_parent, table
from .server_cmds import _common, _store

NO_REPORT = "no report yet"
_WAVE_COLUMNS = (
    ("WAVE", "wave"),
    ("SIZE", "size"),
    ("PENDING", "pending"),
    ("ADMITTED", "admitted"),
    ("SUCCEEDED", "succeeded"),
    ("FAILED", "failed"),
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        parents=[_common(), json_parent()],
        help="the fleet at a glance: classes, releases, campaigns",
        description="Summarise the fleet by class (devices, the current release, devices "
        "by last reported state), by running release and by active campaign (members per "
        "wave and state).",
    )
    p.set_defaults(handler=cmd_status, _cmd_path=["status"])


def fleet_status(store: Any) -> dict[str, Any]:
    """The summary as plain data (the JSON output; the text is rendered from it).
    Campaigns: the active ones (running, paused, halted)."""
    store.tick_campaigns()
    devices = store.list_devices()
    latest = store.latest_reports()
    # By class key, not label: a release published before any device of its class
    # existed is labelled by the class's ids, its devices by their names.
    current = {r.class_key: r for r in store.list_releases(current_only=True)}
    labels = {key: r.class_label for key, r in current.items()}
    labels.update((dev.class_key, dev.class_label) for dev in devices)
    classes: dict[str, dict[str, Any]] = {}
    running: Counter[tuple[str, int | None]] = Counter()
    by_class: defaultdict[tuple[bytes, bytes], Counter[str]] = defaultdict(Counter)
    for dev in devices:
        last = latest.get(dev.id)
        by_class[dev.class_key][last.state if last else NO_REPORT] += 1
        running[(dev.class_label, last.installed_sequence if last else None)] += 1
    for key in sorted(labels, key=labels.__getitem__):
        rel = current.get(key)
        classes[labels[key]] = {
            "devices": sum(by_class[key].values()),
            "current_seq": rel.sequence_number if rel else None,
            "by_state": dict(sorted(by_class[key].items())),
        }
    campaigns = []
    for c in store.list_campaigns(active_only=True):
        status = store.campaign_status(c.id)
        campaigns.append(
            {
                "id": c.id,
                "release": f"{c.class_label}:{c.sequence_number}",
                "state": c.state,
                "waves_opened": c.progress.opened,
                "waves": [
                    {
                        "size": w.size,
                        "pending": w.pending,
                        "admitted": w.admitted,
                        "succeeded": w.succeeded,
                        "failed": w.failed,
                    }
                    for w in status.waves
                ],
            }
        )
    return {
        "devices": len(devices),
        "classes": classes,
        "running": [
            {"class": label, "seq": seq, "devices": n}
            for (label, seq), n in sorted(
                running.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)
            )
        ],
        "campaigns": campaigns,
    }


def cmd_status(args: argparse.Namespace) -> int:
    with _store(args) as store:
        status = fleet_status(store)
    if args.json:
        print(json.dumps(status, sort_keys=True))
        return 0
    n, k = status["devices"], len(status["classes"])
    print(f"{n} device{'s' * (n != 1)} in {k} class{'es' * (k != 1)}")
    if status["classes"]:
        rows = [
            {
                "class": label,
                "devices": c["devices"],
                "current": c["current_seq"],
                "states": ", ".join(f"{n} {s}" for s, n in c["by_state"].items()) or None,
            }
            for label, c in status["classes"].items()
        ]
        print()
        print("\n".join(table(rows, (("CLASS", "class"), ("DEVICES", "devices"),
                                     ("CURRENT SEQ", "current"),
                                     ("LAST REPORTED STATE", "states")))))  # fmt: skip
    if status["running"]:
        print()
        print("\n".join(table(status["running"], (("CLASS", "class"), ("RUNNING SEQ", "seq"),
                                                  ("DEVICES", "devices")))))  # fmt: skip
    print()
    if not status["campaigns"]:
        print("no active campaigns")
    for c in status["campaigns"]:
        print(f"campaign {c['id']} {c['release']}: {c['state']}, "
              f"{c['waves_opened']} of {len(c['waves'])} waves open")  # fmt: skip
        rows = [{"wave": i, **w} for i, w in enumerate(c["waves"], 1)]
        print("\n".join("  " + line for line in table(rows, _WAVE_COLUMNS)))
    return 0
