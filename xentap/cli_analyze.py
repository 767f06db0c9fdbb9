"""`xentap analyze`: the data state of a VBD from its write stream.

Reads a recorded write trace (analyzer/trace.py format, e.g. from
analyzer/capture), runs the streaming analyzer over it and prints the events
and the resulting data state; ``--json`` prints one JSON object.
"""
from __future__ import annotations

import json
import os

import click


def _fmt_ns(t: int | None) -> str:
    if not t:
        return "-"
    import datetime
    return datetime.datetime.fromtimestamp(t / 1e9, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


@click.command("analyze")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--image", type=click.Path(dir_okay=False, exists=True),
              help="The disk as it was before the trace (the replica): layout and old block contents.")
@click.option("--sensitivity", default=1.0, show_default=True, type=float,
              help="Encryption alarm sensitivity (>1 earlier, <1 later).")
@click.option("--window", default="16M", show_default=True,
              help="Recent writes the suspicious share is measured on.")
@click.option("--events/--no-events", "show_events", default=True, show_default=True,
              help="List the events, not only the final state.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def analyze(trace, image, sensitivity, window, show_events, as_json) -> None:
    """Filesystems, consistent points and encryption alarm of a write TRACE."""
    from analyzer import trace as tr
    from analyzer.detector import DetectorConfig
    from analyzer.stream import VbdAnalyzer
    from xentap.cli import XentapError, _size  # here: xentap.cli imports this module

    if not os.path.exists(trace):
        raise XentapError(f"no such trace: {trace}")
    cfg = DetectorConfig(sensitivity=sensitivity, window_bytes=_size(window))
    try:
        cfg.validate()
    except ValueError as e:
        raise XentapError(str(e)) from None
    read = None
    fimg = None
    if image:
        fimg = open(image, "rb")

        def read(off, n):
            fimg.seek(off)
            return fimg.read(n)
    try:
        a = VbdAnalyzer(os.path.basename(trace), detector=cfg, read_old=read)
        evs = a.learn(read) if read else []
        try:
            for r in tr.read(trace):
                if r.kind == tr.WRITE:
                    evs += a.feed(r.seq, r.time_ns, r.sector, r.data)
                else:
                    evs += a.flush(r.seq, r.time_ns)
        except tr.TraceError as e:
            raise XentapError(str(e)) from None
        evs += a.finish()
    finally:
        if fimg:
            fimg.close()
    state = a.state()
    if as_json:
        click.echo(json.dumps({"state": state, "events": [e.as_dict() for e in evs]}, indent=2))
        return
    if show_events:
        click.echo(f"{'SEQ':>8}  {'TIME':12}  {'EVENT':21}  {'OFFSET':>10}  LABEL")
        for e in evs:
            off = "-" if e.offset is None else str(e.offset)
            click.echo(f"{e.seq:>8}  {_fmt_ns(e.time_ns):12}  {e.kind:21}  {off:>10}  {e.label}")
        click.echo("")
    click.echo(f"vbd {state['vbd']}: {state['writes']} writes, {state['bytes'] >> 20} MiB, "
               f"{state['flushes']} flushes; data state: {state['data_state']}")
    for fs in state["filesystems"]:
        click.echo(f"  {fs['type']} at byte {fs['offset']} uuid {fs['uuid'] or '-'} mounted {fs['mounted']}")
    lc = state["last_consistent"]
    click.echo(f"  consistent points: {state['consistent_points']}"
               + (f", last at seq {lc['seq']} ({lc['label']})" if lc else ""))
    al = state["encryption"]["alarm"]
    if al:
        d = al["detail"]
        click.echo(f"  ALARM: mass encryption from write {d['first_seq']} at {_fmt_ns(d['first_time_ns'])}"
                   f" (sector {d['first_sector']}); recommended recovery point: "
                   + (f"seq {d['recommended_seq']} ({d['recommended_label']})"
                      if d["recommended_seq"] is not None else "none before it"))
    else:
        click.echo("  no encryption alarm")
