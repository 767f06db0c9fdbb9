"""`xentap analyze`: the data state of a VBD from its write stream.

``xentap analyze VBD`` (uuid, unique uuid prefix or domN/vdev, as for
``xentap journal``) prints the state the appliance's analyzer published for
that VBD (``<data dir>/<vbd>/analysis.json``, see appliance_domu/analysis.py):
filesystems, consistent points, the encryption alarm and its recommended
recovery point, and whether the analysis keeps up.

``xentap analyze TRACE`` reads a recorded write trace (analyzer/trace.py
format, e.g. from analyzer/capture) instead, runs the streaming analyzer
over it and prints the events and the resulting data state.  ``--json``
prints one JSON object in both modes.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import click

from xentap.cli_journal import DEFAULT_DATA_DIR

_VBD_NAME = re.compile(r"^(dom\d+/\w+|[0-9a-fA-F-]{4,36})$")


def _fmt_ns(t: int | None) -> str:
    if not t:
        return "-"
    import datetime
    return datetime.datetime.fromtimestamp(t / 1e9, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


@click.command("analyze")
@click.argument("target", metavar="VBD|TRACE")
@click.option("--image", type=click.Path(dir_okay=False, exists=True),
              help="The disk as it was before the trace (the replica): layout and old block contents.")
@click.option("--sensitivity", default=1.0, show_default=True, type=float,
              help="Encryption alarm sensitivity (>1 earlier, <1 later).")
@click.option("--window", default="16M", show_default=True,
              help="Recent writes the suspicious share is measured on.")
@click.option("--events/--no-events", "show_events", default=True, show_default=True,
              help="List the events, not only the final state.")
@click.option("--data-dir", default=lambda: os.environ.get("XENTAP_DATA_DIR", DEFAULT_DATA_DIR),
              show_default=DEFAULT_DATA_DIR, type=click.Path(file_okay=False),
              help="The appliance's data directory [env XENTAP_DATA_DIR] (VBD mode).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def analyze(target, image, sensitivity, window, show_events, data_dir, as_json) -> None:
    """Data state of a VBD (filesystems, consistent points, encryption alarm).

    VBD (uuid, unique prefix or domN/vdev): what the appliance's analyzer
    published for it.  TRACE (a file): analyse a recorded write trace."""
    if not os.path.isfile(target) and _VBD_NAME.match(target):
        _analyze_vbd(target, Path(data_dir), show_events, as_json)
        return
    _analyze_trace(target, image, sensitivity, window, show_events, as_json)


def _analyze_trace(trace, image, sensitivity, window, show_events, as_json) -> None:
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
        _print_events([e.as_dict() for e in evs])
    _print_state(state)


def _print_events(evs: list[dict]) -> None:
    click.echo(f"{'SEQ':>8}  {'TIME':12}  {'EVENT':21}  {'OFFSET':>10}  LABEL")
    for e in evs:
        off = "-" if e["offset"] is None else str(e["offset"])
        click.echo(f"{e['seq']:>8}  {_fmt_ns(e['time_ns']):12}  {e['kind']:21}  {off:>10}  "
                   f"{e['label']}")
    click.echo("")


def _analyze_vbd(vbd: str, data_dir: Path, show_events: bool, as_json: bool) -> None:
    from appliance_domu.analysis import read_state
    from xentap.cli import XentapError
    from xentap.cli_journal import _find

    u, d, _ = _find(data_dir, vbd)
    try:
        st = read_state(d)
    except (OSError, ValueError) as e:
        raise XentapError(f"cannot read the analysis state of {u}: {e}") from None
    if st is None:
        raise XentapError(f"no analysis state for VBD {u} in {d} yet (the appliance "
                          f"publishes it once it analysed the VBD's writes)")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    stat = st.get("status") or {}
    age = (time.time_ns() - st.get("updated_ns", 0)) / 1e9
    if show_events and st.get("events"):
        ids = {(e["seq"], e["kind"]) for e in st["events"]}
        _print_events([e for e in st.get("identified", []) if (e["seq"], e["kind"]) not in ids]
                      + st["events"])
    click.echo(f"appliance analysis of {u}, published {age:.1f} s ago: analysed up to seq "
               f"{stat.get('analysed_seq')}, {stat.get('tags', 0)} journal tags"
               + (f"; BEHIND by {stat['behind']} seqs" if stat.get("behind", 0) > 0 else "")
               + (f"; {stat['skipped']} seqs not analysed (fell behind), restarted "
                  f"{stat.get('restarts', 0)} time(s)" if stat.get("skipped") else ""))
    if st.get("state"):
        _print_state(st["state"])
    else:
        click.echo("  no analyzer state yet")


def _print_state(state: dict) -> None:
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
