"""Data-state events of the analyzer, and how they become journal tags.

Every event carries the VBD sequence number it refers to.  An
``fs_consistent`` event's seq is the flush marker after which the
filesystem is consistent; restoring the disk as of that seq (all writes with
seq <= it) gives an image the filesystem's own check accepts (after journal
or log replay).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FS_IDENTIFIED = "fs_identified"
FS_CONSISTENT = "fs_consistent"
MOUNT = "mount"
UNMOUNT = "unmount"
ENCRYPTION_SUSPECTED = "encryption_suspected"
VOLUME_ENCRYPTED = "volume_encrypted"
TAG_LABEL_MAX = 128
KINDS = (FS_IDENTIFIED, FS_CONSISTENT, MOUNT, UNMOUNT, ENCRYPTION_SUSPECTED, VOLUME_ENCRYPTED)


@dataclass(frozen=True)
class Event:
    kind: str
    seq: int
    time_ns: int
    offset: int | None = None  # byte offset of the filesystem / volume on the VBD
    fstype: str | None = None
    label: str = ""
    detail: dict = field(default_factory=dict, compare=False)

    @property
    def consistent(self) -> bool:
        return self.kind == FS_CONSISTENT

    def tag_label(self) -> str:
        """``"<kind>: <label>"`` cut to the journal's 128 UTF-8 bytes."""
        return f"{self.kind}: {self.label}".encode()[:TAG_LABEL_MAX].decode("utf-8", "ignore")

    def tag_kwargs(self) -> dict:
        """Keyword arguments of the journal's checkpoint tag for this event.

        The appliance turns every event into one tag with
        ``journal.add_tag(kind=TagKind.ANALYZER, **event.tag_kwargs())``;
        ``fs_consistent`` events are the consistent ones.
        """
        return {"seq": self.seq, "label": self.tag_label(), "consistent": self.consistent,
                "timestamp_ns": self.time_ns or None}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["consistent"] = self.consistent
        return d
