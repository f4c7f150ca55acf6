"""MTA-STS as a sending MTA meets it: `mta-sts-query` (postfix-mta-sts-resolver,
what home's own Postfix uses towards others) on `internet` reads the
`_mta-sts` TXT record the site published (what `yestls dns` printed) and
fetches the policy over HTTPS from mta-sts.<domain>, the edge, whose
certificate (by ACME) it verifies with the system's trust (Pebble's root
added); it gets the site's mode and MX names.
"""

from __future__ import annotations

import pytest
from scenario import EDGES, container, mx_name_of, site

MODE = site()["site_mta_sts_mode"]


@pytest.mark.parametrize("domain", site()["site_domains"])
def test_a_sender_fetches_the_sites_policy(domain):
    result = container("internet").run(f"mta-sts-query {domain}")
    assert result.rc == 0, result.stderr
    assert "VALID" in result.stdout, result.stdout
    assert f"'mode': '{MODE}'" in result.stdout, result.stdout
    assert f"'mx': {[mx_name_of(edge) for edge in EDGES]!r}" in result.stdout, result.stdout   # every edge
