"""xentap.xenbus.Xs against the xenstored stand-in: pipelined writes."""
from __future__ import annotations

import errno

import pytest

from xentap.xenbus import Xs, XenstoreError


@pytest.fixture
def xs(xenstore):
    with Xs.open(xenstore.socket_path) as x:
        yield x


def test_write_many_writes_makes_empty_nodes_and_removes(xs):
    xs.write("/t/gone", "x")
    n = xs.write_many([("/t/a", "1"), ("/t/b", 2), ("/t/empty", ""), ("/t/gone", None),
                       ("/t/never-there", None)])
    assert n == 5
    assert (xs.read("/t/a"), xs.read("/t/b"), xs.read("/t/empty")) == ("1", "2", "")
    assert xs.read("/t/gone") is None
    assert sorted(xs.ls("/t")) == ["a", "b", "empty"]


def test_write_many_matches_every_reply_to_its_request(xs):
    """Thousands of requests in flight at once, in order, all answered."""
    items = [(f"/many/k{i}", f"v{i}") for i in range(3000)]
    assert xs.write_many(items) == 3000
    assert [xs.read(p) for p, _ in items] == [v for _, v in items]


def test_write_many_in_a_transaction_shows_nothing_before_commit(xenstore, xs):
    with Xs.open(xenstore.socket_path) as other:
        seen = []

        def tx(t: Xs) -> None:
            t.write_many([("/tx/a", "1"), ("/tx/b", "2")])
            seen.append(other.read("/tx/a"))

        xs.transaction(tx)
        assert seen == [None]
        assert (other.read("/tx/a"), other.read("/tx/b")) == ("1", "2")


def test_write_many_reports_the_failed_request_and_the_connection_goes_on(xs):
    with pytest.raises(XenstoreError) as e:
        xs.write_many([("/e/a", "1"), ("/", None), ("/e/b", "2")])    # rm of the root: EINVAL
    assert e.value.errno == errno.EINVAL and "rm /" in str(e.value)
    # the requests around it were answered (not left to confuse later calls)
    assert (xs.read("/e/a"), xs.read("/e/b")) == ("1", "2")
    xs.write("/e/c", "3")
    assert xs.read("/e/c") == "3"


@pytest.mark.parametrize("path, value", [("/bad path", "1"), ("/ok", "caf\u00e9"), ("/ok", "a\nb")])
def test_write_many_refuses_what_xenstore_cannot_take_before_sending_anything(xs, path, value):
    with pytest.raises(XenstoreError) as e:
        xs.write_many([("/r/first", "1"), (path, value)])
    assert e.value.errno == errno.EINVAL
    assert xs.read("/r/first") is None and xs.read("/ok") is None
    xs.write_many([("/r/first", "1")])      # the connection goes on
    assert xs.read("/r/first") == "1"


def test_read_many_gives_none_for_absent_nodes(xs):
    xs.write_many([("/m/a", "1"), ("/m/b", "")])
    assert xs.read_many(["/m/a", "/m/b", "/m/nope", "/nowhere/x"]) == ["1", "", None, None]
    assert xs.read_many([]) == []


def test_read_dir_reads_every_child(xs):
    xs.write_many([(f"/d/k{i}", str(i)) for i in range(50)])
    assert xs.read_dir("/d") == {f"k{i}": str(i) for i in range(50)}
    assert xs.read_dir("/no/such/dir") == {}


def test_read_many_refuses_a_bad_path_and_the_connection_goes_on(xs):
    xs.write("/g/a", "1")
    with pytest.raises(XenstoreError) as e:
        xs.read_many(["/g/a", "/bad path"])
    assert e.value.errno == errno.EINVAL
    assert xs.read_many(["/g/a"]) == ["1"]
