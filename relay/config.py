"""Reading TOML configuration with errors that name the file, the key and the fix.

    table = Table.load(path)
    port = table.get("port", int, default=25, check=lambda p: 0 < p < 65536, hint="a TCP port")
    table.done()   # refuses keys nobody asked for: a typo must not pass silently
"""

import ipaddress
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

_REQUIRED = object()


class ConfigError(Exception):
    pass


class Table:
    def __init__(self, path: Path, data: dict, where: str = ""):
        self.path = path
        self.data = data
        self.where = where
        self._read: set[str] = set()

    @classmethod
    def load(cls, path: Path) -> "Table":
        try:
            with open(path, "rb") as f:
                return cls(path, tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; pass the right --config path") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None

    def _name(self, key: str) -> str:
        """The key's dotted name; "" names the table itself."""
        return f"{self.where}.{key}" if self.where and key else self.where or key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self._name(key)}: {message}")

    def get(self, key: str, kind: type | tuple, default: Any = _REQUIRED,
            check: Callable[[Any], bool] | None = None, hint: str = "") -> Any:
        self._read.add(key)
        what = f" ({hint})" if hint else ""
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, f"missing; set it{what}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:  # TOML true is not a number
            kinds = ()
        if not isinstance(value, kinds) or (check is not None and not check(value)):
            raise self.error(key, f"{value!r} is not valid{what}")
        return value

    def address(self, key: str, default: Any = _REQUIRED, hint: str = "") -> tuple[str, int] | None:
        """One "HOST:PORT" string, parsed; `default` (e.g. None) when absent."""
        text = self.get(key, str, default=default, hint=hint or '"HOST:PORT"')
        if text is None or isinstance(text, tuple):
            return text
        try:
            return parse_address(text)
        except ValueError as error:
            raise self.error(key, f"{error}; write HOST:PORT") from None

    def addresses(self, key: str, default: Any = _REQUIRED, hint: str = "") -> tuple[tuple[str, int], ...]:
        """A list of "HOST:PORT" strings, parsed."""
        texts = self.get(key, list, default=default, check=lambda v: all(isinstance(x, str) for x in v),
                         hint=hint or 'a list of "HOST:PORT"')
        result = []
        for text in texts or ():
            try:
                result.append(parse_address(text))
            except ValueError as error:
                raise self.error(key, f"{error}; write HOST:PORT") from None
        return tuple(result)

    def tables(self, key: str) -> list["Table"]:
        """An array of tables ([[key]]), each as a Table."""
        self._read.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise self.error(key, "must be an array of tables, written [[" + key + "]]")
        return [Table(self.path, item, f"{self._name(key)}[{i}]") for i, item in enumerate(items)]

    def table(self, key: str) -> "Table":
        self._read.add(key)
        item = self.data.get(key, {})
        if not isinstance(item, dict):
            raise self.error(key, "must be a table, written [" + key + "]")
        return Table(self.path, item, self._name(key))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown setting; check the spelling against the documented settings")


def is_ipv4(text) -> bool:
    """An IPv4 address written as one (a setting the tunnel or DNS needs as IPv4)."""
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """"HOST:PORT" or "[v6]:PORT" -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r} is not HOST:PORT")
        host, port = text, str(default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} has no valid port")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return host, int(port)
