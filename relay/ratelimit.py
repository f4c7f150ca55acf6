"""The one rate limiter: a token bucket, with the clock passed in.

Used by relay.tunnel (each peer's request rate, e.g. the oracle's signatures)
and relay.audit (each source's refusal lines).
"""


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second; `take(now)` spends one if there is one."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def refund(self) -> None:
        """Give back a token taken for something that turned out not to cost it."""
        self.tokens = min(float(self.burst), self.tokens + 1)
