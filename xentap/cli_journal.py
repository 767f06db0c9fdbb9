"""`xentap journal ...`: the appliance's CDP journals (list, checkpoints, restore, verify).

Registered by xentap/cli.py with ``cli.add_command(cli_journal.journal)``.
They read the journals under the appliance's data directory, also while the
appliance runs (a restore holds off retention trims only while it copies the
base image).  Human tables by default, ``--json`` for scripts; errors are one
line and a non-zero exit (:class:`JournalCliError`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import click

DEFAULT_DATA_DIR = "/var/lib/xentap/appliance"  # = xentap.cli_appliance.DEFAULT_DATA_DIR


class JournalCliError(click.ClickException):
    """A user-facing error: printed as one line ("xentap: ..."), exit status 1."""

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"xentap: {self.format_message()}", err=True)


def one_line(e: BaseException) -> str:
    """An exception as one line for a user (every `xentap` command's errors):
    an OS error as its reason and file, without "[Errno N]"; anything else as
    the first line of its text."""
    s = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in s:
        s += f": {e.filename}"
    return s.splitlines()[0]


# ------------------------------------------------------------------ parsing

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.I)
_DUR_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '24h', '7d' -> seconds (ValueError otherwise)."""
    m = _DUR.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 24h, 7d)")
    return float(m.group(1)) * _DUR_UNITS[(m.group(2) or "s").lower()]


def parse_time(text: str, now_ns: int | None = None) -> int:
    """A point in time -> ns since the epoch.  Accepts ISO 8601 (UTC unless it says
    otherwise), seconds since the epoch, 'now', or '-10m' / '-2h' (before now)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    t = text.strip()
    if t.lower() == "now":
        return now_ns
    if t.startswith("-"):
        return now_ns - int(parse_duration(t[1:]) * 1e9)
    try:
        return int(float(t) * 1e9)
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO 8601 like 2026-11-25T18:00:00Z, "
                         f"seconds since the epoch, or -10m)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp()) * 1_000_000_000 + d.microsecond * 1000


def fmt_ns(ns: int) -> str:
    if not ns:
        return "-"
    from engines.journal import fmt_time
    return fmt_time(ns)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ------------------------------------------------------------------ finding VBDs


def _vbds(data_dir: Path) -> list[tuple[str, Path, dict]]:
    """(uuid, directory, replica state) of every VBD with a journal."""
    if not data_dir.is_dir():
        raise JournalCliError(f"no appliance data directory {data_dir} (see --data-dir)")
    out = []
    for d in sorted(data_dir.iterdir()):
        try:
            u = str(uuid.UUID(d.name))
        except ValueError:
            continue
        if not (d / "journal" / "meta.json").exists():
            continue
        try:
            st = json.loads((d / "state.json").read_bytes())
            if not isinstance(st, dict):
                st = {}
        except (OSError, ValueError):
            st = {}
        out.append((u, d, st))
    return out


def _name(st: dict) -> str:
    if st.get("domid") or st.get("vdev"):
        return f"dom{st.get('domid', '?')}/{st.get('vdev') or st.get('devid', '?')}"
    return "-"


def _check_writable(path: Path, force: bool) -> Path:
    """Refuses, in one line, an output file that exists (without --force) or
    cannot be written; returns its directory."""
    if path.exists() and not force:
        raise JournalCliError(f"{path} exists (use --force to overwrite it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise JournalCliError(f"cannot write {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise JournalCliError(f"cannot write {path}: permission denied")
    return parent


def _find(data_dir: Path, vbd: str) -> tuple[str, Path, dict]:
    """A VBD by uuid, unique uuid prefix, or domN/vdev."""
    vbds = _vbds(data_dir)
    hits = [v for v in vbds if v[0] == vbd.lower()] or \
        [v for v in vbds if _name(v[2]) == vbd] or \
        [v for v in vbds if len(vbd) >= 4 and v[0].startswith(vbd.lower())]
    if not hits:
        raise JournalCliError(f"unknown VBD {vbd!r}: no journal for it in {data_dir} "
                              f"(see 'xentap journal list')")
    if len(hits) > 1:
        raise JournalCliError(f"VBD {vbd!r} is ambiguous: " + ", ".join(h[0] for h in hits))
    return hits[0]


def _open(d: Path):
    from engines.journal import Journal
    try:
        return Journal.open(d / "journal")
    except OSError as e:
        raise JournalCliError(one_line(e)) from None


# ------------------------------------------------------------------ commands

_data_dir_opt = click.option(
    "--data-dir", default=lambda: os.environ.get("XENTAP_DATA_DIR", DEFAULT_DATA_DIR),
    show_default=DEFAULT_DATA_DIR, type=click.Path(file_okay=False),
    help="The appliance's data directory [env XENTAP_DATA_DIR].")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group("journal")
def journal() -> None:
    """The CDP journals: history windows, checkpoints, restore to any point in time."""


@journal.command("list")
@_data_dir_opt
@_json_opt
def list_cmd(data_dir: str, as_json: bool) -> None:
    """VBDs with a journal: history window, size, RPO."""
    now = time.time_ns()
    rows = []
    for u, d, st in _vbds(Path(data_dir)):
        j = _open(d)
        try:
            info = j.info()
        finally:
            j.close()
        last = info["last_ts_ns"]
        info.update(vbd=u, name=_name(st), domid=st.get("domid"), vdev=st.get("vdev"),
                    rpo_seconds=round((now - last) / 1e9, 3) if last else None,
                    first_time=fmt_ns(info["first_ts_ns"]), last_time=fmt_ns(last))
        rows.append(info)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no journals in {data_dir}")
        return
    click.echo(f"{'VBD':36}  {'NAME':12}  {'FROM':24}  {'TO':24}  {'WINDOW':>9}  "
               f"{'SEQS':>17}  {'SIZE':>10}  {'RPO':>8}")
    for r in rows:
        rpo = "-" if r["rpo_seconds"] is None else f"{r['rpo_seconds']:.1f}s"
        seqs = f"{r['first_seq']}..{r['last_seq']}"
        click.echo(f"{r['vbd']:36}  {r['name']:12}  {r['first_time']:24}  {r['last_time']:24}  "
                   f"{r['window_seconds']:8.0f}s  {seqs:>17}  "
                   f"{fmt_bytes(r['journal_bytes']):>10}  {rpo:>8}")
        for w in r["warnings"]:
            click.echo(f"  warning: {w}")


@journal.command("checkpoints")
@click.argument("vbd")
@click.option("--consistent", is_flag=True, help="Only crash-consistent checkpoints.")
@click.option("--kind", type=click.Choice(["flush", "user", "analyzer"]), multiple=True,
              help="Only these kinds (repeatable).")
@click.option("--last", type=click.IntRange(1), default=None, metavar="N",
              help="Only the N newest.")
@_data_dir_opt
@_json_opt
def checkpoints_cmd(vbd: str, consistent: bool, kind, last, data_dir: str,
                    as_json: bool) -> None:
    """Checkpoints of VBD: every flush (crash-consistent), user and analyzer tags."""
    _, d, _ = _find(Path(data_dir), vbd)
    j = _open(d)
    try:
        cps = j.checkpoints(consistent_only=consistent)
    finally:
        j.close()
    if kind:
        cps = [c for c in cps if c.kind_name in kind]
    if last:
        cps = cps[-last:]
    if as_json:
        click.echo(json.dumps([dict(c.to_dict(), time=fmt_ns(c.timestamp_ns)) for c in cps],
                              indent=2))
        return
    if not cps:
        click.echo("no checkpoints in the window")
        return
    click.echo(f"{'ID':>12}  {'TIME':24}  {'KIND':8}  {'CONSISTENT':10}  LABEL")
    for c in cps:
        click.echo(f"{c.id:>12}  {fmt_ns(c.timestamp_ns):24}  {c.kind_name:8}  "
                   f"{'yes' if c.consistent else 'no':10}  {c.label}")


@journal.command("restore")
@click.argument("vbd")
@click.option("--at", "at", metavar="TIME",
              help="ISO 8601 (UTC unless stated), seconds since the epoch, -10m, or now "
                   "(a time after the newest write restores the latest point).")
@click.option("--checkpoint", "checkpoint", type=int, metavar="ID",
              help="A checkpoint id from 'xentap journal checkpoints'.")
@click.option("--seq", "seq", type=click.IntRange(0), metavar="N",
              help="Right after write number N (any write boundary).")
@click.option("--to", "target", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="The image file to write (created).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@_data_dir_opt
@_json_opt
def restore_cmd(vbd: str, at, checkpoint, seq, target: str, force: bool, data_dir: str,
                as_json: bool) -> None:
    """Write VBD's disk as it was at a point in time to FILE."""
    from engines.journal import OutOfWindow

    if sum(x is not None for x in (at, checkpoint, seq)) != 1:
        raise JournalCliError("give exactly one of --at, --checkpoint, --seq")
    try:
        t_ns = parse_time(at) if at is not None else None
    except ValueError as e:
        raise JournalCliError(str(e)) from None
    tgt = Path(target)
    _check_writable(tgt, force)
    u, d, _ = _find(Path(data_dir), vbd)
    j = _open(d)
    try:
        cp = None
        try:
            latest_note = None
            if t_ns is not None and j.last_ts_durable < t_ns <= time.time_ns() \
                    and j.durable_seq > j.base_seq:
                # after the newest journaled write and not in the future: the latest point
                target_seq = j.durable_seq
                latest_note = (f"note: {fmt_ns(t_ns)} is after the newest journaled write "
                               f"({fmt_ns(j.last_ts_durable)}): restoring the latest point")
            elif t_ns is not None:
                target_seq = j.seq_at(t_ns)
            elif checkpoint is not None:
                cps = [c for c in j.checkpoints() if c.id == checkpoint]
                if not cps:
                    raise JournalCliError(f"no checkpoint {checkpoint} in the window of {u} "
                                          f"(see 'xentap journal checkpoints {vbd}')")
                cp = max(cps, key=lambda c: c.consistent)
                target_seq = cp.seq
            else:
                target_seq = seq
            if not (j.base_seq <= target_seq <= j.durable_seq):
                raise OutOfWindow(0, f"seq {target_seq} is outside the history window "
                                  f"({j.base_seq}..{j.durable_seq})")
            existed = tgt.exists()
            try:
                os.close(os.open(tgt, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                res = _restore(j, u, tgt, target_seq, as_json)
            except BaseException:
                if not existed:  # no half-written image left behind
                    try:
                        tgt.unlink()
                    except OSError:
                        pass
                raise
        except OutOfWindow as e:
            raise JournalCliError(one_line(e)) from None
        except OSError as e:
            raise JournalCliError(one_line(e)) from None
    finally:
        j.close()
    if latest_note and not as_json:
        click.echo(latest_note, err=True)
    _report_restore(res, u, tgt, t_ns, cp, as_json)


def _restore(j, u: str, tgt: Path, target_seq: int, as_json: bool) -> dict:
    if as_json:
        return j.restore(tgt, seq=target_seq)
    with click.progressbar(length=1, label=f"restoring {u} to seq {target_seq}",
                           file=sys.stderr) as bar:
        def progress(done, total):
            bar.length = max(total, 1)
            bar.update(done - bar.pos)
        return j.restore(tgt, seq=target_seq, progress=progress)


def _report_restore(res: dict, u: str, tgt: Path, t_ns, cp, as_json: bool) -> None:
    res.update(vbd=u, to=str(tgt), at=fmt_ns(t_ns) if t_ns else None,
               checkpoint=cp.to_dict() if cp else None,
               mb_s=round(res["bytes"] / res["seconds"] / 1e6, 1) if res["seconds"] else None)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"restored {u} to seq {res['seq']} into {tgt}: {fmt_bytes(res['bytes'])} in "
               f"{res['seconds']:.1f} s ({res['mb_s']} MB/s), "
               f"{fmt_bytes(res['replayed_bytes'])} of journal replayed")
    if not res["write_ordered"]:
        click.echo("warning: this point lies inside a GAP/RESYNC window: the image is not "
                   "write-ordered (not crash-consistent)", err=True)
    elif cp is not None and not cp.consistent:
        click.echo("note: this checkpoint is not marked crash-consistent", err=True)


@journal.command("verify")
@click.argument("vbd")
@_data_dir_opt
@_json_opt
def verify_cmd(vbd: str, data_dir: str, as_json: bool) -> None:
    """Read every frame of VBD's journal: checksums, seq continuity, decompression."""
    u, d, _ = _find(Path(data_dir), vbd)
    j = _open(d)
    try:
        if as_json:
            res = j.verify()
        else:
            with click.progressbar(length=max(j.journal_bytes, 1), label=f"verifying {u}",
                                   file=sys.stderr) as bar:
                res = j.verify(progress=lambda done, total: bar.update(done - bar.pos))
    finally:
        j.close()
    res["vbd"] = u
    if as_json:
        click.echo(json.dumps(res, indent=2))
    elif res["ok"]:
        click.echo(f"{u}: ok, {res['frames']} frames, {res['records']} records, seqs "
                   f"{res['first_seq']}..{res['last_seq']}")
    if not res["ok"]:
        if not as_json:
            for p in res["problems"]:
                click.echo(f"{u}: {p}")
        raise JournalCliError(f"journal of {u} has {len(res['problems'])} problem(s)")


# ------------------------------------------------------------------ export-trace


def _journal_records(j, to_seq: int, progress=None):
    """(seq, kind, timestamp_ns, sector, length, flags, data) of every record
    base_seq < seq <= to_seq, in seq order, read frame by frame from the
    segments (each frame's checksum checked); ``progress(frame bytes)`` after
    each frame.  A missing seq is an error (JournalError)."""
    import errno

    from engines import journal as jm

    expect = j.base_seq + 1
    for s in list(j.segments):
        if not s.last_seq or s.last_seq < expect or s.first_seq > to_seq:
            continue
        ents = [e for e in j._idx_entries(s) if e[1] >= expect and e[0] <= to_seq]
        if not ents:
            continue
        with open(s.xjs, "rb") as f:
            for e in ents:
                h, table, payload = jm._read_frame(f, e[4])
                if h[1] == jm.FT_RECORDS:
                    if h[4] > expect:
                        raise jm.JournalError(errno.EIO, f"seqs {expect}..{h[4] - 1} are "
                                              f"missing from the journal (run 'xentap "
                                              f"journal verify')")
                    raw = memoryview(jm._payload(h, payload, j._dctx))
                    pos = 0
                    for i, (ts, sector, length, flags, kind, _) in \
                            enumerate(jm.REC.iter_unpack(table)):
                        seq = h[4] + i
                        has = jm._has_data(kind, flags, length)
                        data = raw[pos:pos + length] if has else None
                        if has:
                            pos += length
                        if expect <= seq <= to_seq:
                            yield seq, kind, ts, sector, length, flags, data
                    expect = max(expect, h[5] + 1)
                if progress:
                    progress(e[5])
                if expect > to_seq:
                    return
    if expect <= to_seq:
        raise jm.JournalError(errno.EIO, f"seqs {expect}..{to_seq} are missing from the "
                              f"journal (run 'xentap journal verify')")


_ZERO_CHUNK = 4 << 20  # a ZEROES range is written as zero-filled records of at most this


def _open_trace_out(path: Path):
    """A binary file for writing a trace, compressed by the suffix of ``path``
    (.gz, .xz, .zst) as analyzer.trace reads them."""
    p = str(path)
    if p.endswith(".gz"):
        import gzip
        return gzip.open(p, "wb", compresslevel=9)
    if p.endswith(".xz"):
        import lzma
        return lzma.open(p, "wb")
    if p.endswith(".zst"):
        import zstandard
        return zstandard.open(p, "wb", cctx=zstandard.ZstdCompressor(level=19))
    return open(p, "wb")


def export_trace(j, out: Path, to_seq: int, progress=None) -> dict:
    """Write the records base_seq < seq <= to_seq of journal ``j`` to ``out`` as
    an analyzer write trace (analyzer/trace.py), keeping the journal's seqs
    and times.  WRITE and RESYNC data become writes, ZEROES ranges zero-filled
    writes, FLUSH flush markers; DISCARDs (the trace has no such record) and
    checkpoint tags are left out and counted.  GAP..RESYNC_END windows (not
    write-ordered) are counted too.  Returns the figures."""
    from analyzer import trace as tr
    from engines.journal import F_DISCARD, F_ZEROES, Kind

    fig = dict(first_seq=None, last_seq=None, writes=0, write_bytes=0, flushes=0,
               zero_bytes=0, discards=0, discard_bytes=0, tags=0, gaps=0, resyncs=0)
    pack = tr.REC.pack
    with _open_trace_out(out) as f:
        f.write(tr.MAGIC)
        for seq, kind, ts, sector, length, flags, data in _journal_records(j, to_seq, progress):
            if fig["first_seq"] is None:
                fig["first_seq"] = seq
            fig["last_seq"] = seq
            off = sector * 512
            if kind in (Kind.WRITE, Kind.RESYNC):
                if kind == Kind.RESYNC:
                    fig["resyncs"] += 1
                if data is not None:
                    f.write(pack(tr.WRITE, length, seq, ts, off))
                    f.write(data)
                    fig["writes"] += 1
                    fig["write_bytes"] += length
                elif flags & F_ZEROES or kind == Kind.RESYNC:
                    for o in range(0, length, _ZERO_CHUNK):
                        n = min(_ZERO_CHUNK, length - o)
                        f.write(pack(tr.WRITE, n, seq, ts, off + o))
                        f.write(bytes(n))
                    fig["writes"] += 1
                    fig["zero_bytes"] += length
                elif flags & F_DISCARD:
                    fig["discards"] += 1
                    fig["discard_bytes"] += length
            elif kind == Kind.FLUSH:
                f.write(pack(tr.FLUSH, 0, seq, ts, 0))
                fig["flushes"] += 1
            elif kind == Kind.GAP:
                fig["gaps"] += 1
            elif kind == Kind.CHECKPOINT:
                fig["tags"] += 1
    return fig


@journal.command("export-trace")
@click.argument("vbd")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="The trace to write (.gz, .xz, .zst: compressed).")
@click.option("--to-seq", "to_seq", type=click.IntRange(1), metavar="N",
              help="Stop after seq N (default: the newest journaled write).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@_data_dir_opt
@_json_opt
def export_trace_cmd(vbd: str, output: str, to_seq, force: bool, data_dir: str,
                     as_json: bool) -> None:
    """Write VBD's journaled writes and flushes, in order, as a write trace.

    The trace (analyzer/trace.py's format, what `xentap analyze` and the
    analyzer's tests read) keeps the journal's seqs and times.  It starts
    from the empty disk, so the journal must still hold every write from
    seq 1.  Discards (the trace has no record for them) and checkpoint tags
    are left out and counted."""
    from engines.journal import JournalError

    out = Path(output)
    parent = _check_writable(out, force)
    u, d, _ = _find(Path(data_dir), vbd)
    j = _open(d)
    tmp = parent / f".part.{out.name}"  # same suffix: same compression
    try:
        if j.base_seq:
            raise JournalCliError(
                f"the journal of {u} starts after seq {j.base_seq} (older writes were "
                f"trimmed into its base image): a trace needs every write from the empty disk")
        last = j.durable_seq
        if last == 0:
            raise JournalCliError(f"the journal of {u} holds no writes")
        if to_seq is not None and to_seq > last:
            raise JournalCliError(f"--to-seq {to_seq} is after the newest journaled seq {last}")
        end = last if to_seq is None else to_seq
        t0 = time.perf_counter()
        try:
            try:  # before the progress bar: a file we cannot write is one line
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o644))
            except OSError as e:
                raise JournalCliError(f"cannot write {out}: {e.strerror or e}") from None
            if as_json:
                fig = export_trace(j, tmp, end)
            else:
                total = sum(e[5] for s in j.segments for e in j._idx_entries(s)
                            if e[0] <= end)
                with click.progressbar(length=max(total, 1), label=f"exporting {u}",
                                       file=sys.stderr) as bar:
                    fig = export_trace(j, tmp, end, progress=bar.update)
            os.replace(tmp, out)
        except JournalCliError:
            raise
        except (JournalError, OSError, EOFError, ValueError) as e:
            raise JournalCliError(one_line(e)) from None
        except Exception as e:  # zstd's errors and the like: still one line
            raise JournalCliError(f"{type(e).__name__}: {one_line(e)}") from None
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        j.close()
    fig.update(vbd=u, output=str(out), output_bytes=out.stat().st_size,
               seconds=round(time.perf_counter() - t0, 3))
    if as_json:
        click.echo(json.dumps(fig, indent=2))
        return
    click.echo(f"exported seqs {fig['first_seq']}..{fig['last_seq']} of {u} to {out} "
               f"({fmt_bytes(fig['output_bytes'])}): {fig['writes']} writes "
               f"({fmt_bytes(fig['write_bytes'] + fig['zero_bytes'])}), {fig['flushes']} flushes")
    if fig["discards"]:
        click.echo(f"note: {fig['discards']} discards ({fmt_bytes(fig['discard_bytes'])}) "
                   f"left out: a trace has no discard record", err=True)
    if fig["gaps"]:
        click.echo(f"warning: {fig['gaps']} GAP..RESYNC window(s): the writes in them are "
                   f"not in write order (not crash-consistent)", err=True)
