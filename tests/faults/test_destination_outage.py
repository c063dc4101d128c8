"""Issue 10's destination outage at full length: a host answering 503 for 60 s, interleaved
with a healthy host on the same partitions of one group (the fast suite runs 15 s of it).
The healthy host's median delay stays under 1 s in every 5 s window; every call to the
broken host is delivered after it recovers or dead-lettered per policy; none is lost."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.faults.conftest import Cluster
from tests.support import Bigpipe
from tests.test_destination_shields import run_outage

pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.timeout(300)]


async def test_a_destination_down_60_s_holds_back_only_its_own_calls(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    await run_outage(cluster.bootstrap, http, tmp_path, processes, outage_seconds=60)
