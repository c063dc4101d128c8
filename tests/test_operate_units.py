"""Pure units of the operator's tools and the Go compatibility: no Kafka, no processes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from bigpipe.calls.envelope import Call, InvalidRecord, decode_call, encode_call
from bigpipe.config import AclEntry
from bigpipe.ingest.compat import GO_CALLER, decode_go_record, go_caller_entry, go_field_problem
from bigpipe.ingest.destinations import AllowRule
from bigpipe.operate import replay as replay_command
from bigpipe.operate.commands import main as operate
from bigpipe.operate.resend import ResendFailed
from bigpipe.operate.selection import Filters, SelectionError, parse_filters, parse_time
from tests.support import base_config

NOW = 1_800_000_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-04T08:00:00Z", 1796371200000),
        ("2026-12-04", 1796342400000),
        ("1796371200000", 1796371200000),
        ("90s", NOW - 90_000),
        ("2h", NOW - 7_200_000),
        ("7d", NOW - 7 * 86_400_000),
    ],
)
def test_times_an_operator_may_write(text: str, expected: int) -> None:
    assert parse_time(text, "--since", NOW) == expected


def test_a_time_that_is_not_one_names_the_option() -> None:
    with pytest.raises(SelectionError, match="--until: 'tomorrow' is not a time"):
        parse_time("tomorrow", "--until", NOW)
    with pytest.raises(SelectionError, match="--until: must be later than --since"):
        parse_filters({"since": "1000", "until": "1000"})
    with pytest.raises(SelectionError, match="--status"):
        parse_filters({"status": "abc"})


def test_url_host_and_caller_filters() -> None:
    call = {"url": "https://API.example.com/hooks/1", "caller": "shop"}
    assert Filters(url_prefix="https://API.example.com/hooks/").matches_call(call)
    assert Filters(host="api.example.com").matches_call(call)
    assert not Filters(host="example.com").matches_call(call)
    assert not Filters(caller="other").matches_call(call)


def test_a_call_sent_again_keeps_its_fields_through_the_envelope() -> None:
    call = Call("ab" * 16, "http://x/y", "d", "c", 1, {"A": "b"}, "G2", 2, True)
    assert decode_call(encode_call(call)) == call
    plain = Call("cd" * 16, "http://x/y", "d", "c", 1, {})
    assert b"group" not in encode_call(plain), "a call as accepted keeps its small shape"
    with pytest.raises(InvalidRecord):
        decode_call(encode_call(call).replace(b'"redrive":2', b'"redrive":"2"'))


def test_a_go_record_keeps_its_data_and_loses_its_credentials() -> None:
    value = orjson.dumps(
        {
            "Headers": {"Authorization": ["Bearer x"], "X-Trace": ["a", "b"]},
            "Url": "http://svc/hook",
            "Data": "héllo",
            "Topic": "test",
            "Partition": 1,
            "CreateTime": 1712000000000,
        }
    )
    call = decode_go_record(value, "test", 1, 7)
    assert (call.data, call.url, call.caller) == ("héllo", "http://svc/hook", GO_CALLER)
    assert call.headers == {"X-Trace": "a, b"}
    assert call.id == hashlib.sha256(b"test/1/7").hexdigest()[:32]
    with pytest.raises(InvalidRecord, match="'Partition'"):
        decode_go_record(value.replace(b'"Partition":1', b'"Partition":"1"'), "test", 1, 7)


def test_a_go_record_goes_where_one_of_its_topics_callers_may_call() -> None:
    rule = AllowRule("api.example.com", "api.example.com")
    open_caller = AclEntry(name="a", secret_sha256=b"", topic="t")
    narrow = AclEntry(name="b", secret_sha256=b"", topic="t", allow=(rule,), deny_private=True)
    elsewhere = AclEntry(name="c", secret_sha256=b"", topic="u", deny_private=True)
    assert go_caller_entry((open_caller, narrow), "t").allow == ()
    only_narrow = go_caller_entry((narrow, elsewhere), "t")
    assert (only_narrow.allow, only_narrow.deny_private) == ((rule,), True)
    assert go_caller_entry((elsewhere,), "t") is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"null", "url无效"),
        (b'{"url": "u", "data": "d", "partition_key": "k", "acl": {"name": "n"}}', "acl.secret"),
        (
            b'{"url": "u", "data": "d", "partition_key": "k", "acl": {"name": "n", "secret": "s"}}',
            None,
        ),
    ],
)
def test_the_originals_field_order(body: bytes, problem: str | None) -> None:
    assert go_field_problem(orjson.loads(body)) == problem


def test_a_call_sent_again_by_an_operator_is_not_expired_by_its_ttl() -> None:
    from bigpipe.delivery.waits import Expiry

    old = Call("ef" * 16, "http://x/y", "d", "c", 1, {}, ttl_ms=1000)
    assert Expiry(old, None).passed(), "a day-old call with a 1 s ttl is expired"
    resent = Call("ef" * 16, "http://x/y", "d", "c", 1, {}, "G1", 1, ttl_ms=1000)
    assert not Expiry(resent, 5000).passed(), "a redrive delivers it now, whatever its age"


def operator_command(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run `bigpipe ARGV -config FILE` on a valid config; its exit code and stderr."""
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(base_config("127.0.0.1:1", "calls", 8080)))
    code = operate([*argv, "-config", str(path)])
    return code, capsys.readouterr().err


def test_a_negative_limit_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = operator_command(["dlq", "list", "--limit", "-1"], tmp_path, capsys)
    assert (code, err) == (2, "bigpipe: --limit: must be 0 or more, got -1\n")


def test_a_replay_kafka_refused_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_args: object, **_kwargs: object) -> None:
        raise ResendFailed("Kafka refused 3 of 10 calls: Broker: Message size too large")

    monkeypatch.setattr(replay_command, "replay", refused)
    code, err = operator_command(["replay", "--group", "g", "--since", "2h"], tmp_path, capsys)
    assert code == 1
    assert err.splitlines() == [
        "bigpipe replay: Kafka refused 3 of 10 calls: Broker: Message size too large"
    ]
