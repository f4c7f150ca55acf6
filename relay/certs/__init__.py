"""ACME at home: certificates for keys that never leave home (`yestls cert renew`, `yestls cert status`).

The flow (docs/certificates.md):

    keystore key ──`yestls keys csr`──▶ state_dir/certificates/<label>/csr.pem   (the deployment puts it there)
    `yestls cert renew` (a timer, as the ACME user): account key in state_dir, an order for the CSR's
        names, each challenge answered through the edge (HTTP-01: the token pushed over the tunnel) or by
        an RFC 2136 update (DNS-01), the chain written to <label>/chain.pem, state.json updated
    a deployment hook (systemd path unit) imports chain.pem into the keystore as the signer's user
        (`yestls keys import`) or installs it for Postfix/Dovecot; the edge serves it at its next refresh

The ACME protocol is the `acme` library's (certbot's); this package only
drives it. The CSR is made at home by the keystore's user, so the ACME user
never holds a TLS key: it holds its account key and writes public chains.

    store.py   certificate directories, state.json, when each is due, backoff (no network)
    ca.py      the ACME account and one order, with a challenge solver
    http01.py  the HTTP-01 solver: key authorizations pushed to the edge's tunnel service
    dns01.py   the DNS-01 solver: TXT records by RFC 2136 update with TSIG
    cli.py     `yestls cert renew|status`
"""
