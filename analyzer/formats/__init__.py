"""On-disk format parsers for the data analyzer.

One small module per format, each declaring its structures with ``construct``
and offering a ``detect(buf, ...)`` helper that returns a parsed result or
``None``.  Input is hostile guest data: every public helper must return
``None`` (or a result whose ``*_ok`` fields say "invalid") on garbage, never
raise, never loop or allocate without a bound fixed by the module.
"""

from . import ext4, gpt, jbd2, luks, lvm, mbr, ntfs, swap, xfs  # noqa: E402,F401

__all__ = ["ext4", "gpt", "jbd2", "luks", "lvm", "mbr", "ntfs", "swap", "xfs"]
