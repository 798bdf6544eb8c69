"""containerd's command line for a shim: `-namespace ns -address a -id x start` (Go flag syntax)."""

from __future__ import annotations

# no pykata.errors here: `start` handed to the fork server parses its flags and needs nothing else of
# pykata (pykata.shim.starterror holds the error, imported only when a flag is bad)


class Flags:
    """containerd's command line for a shim (Go flag syntax). A plain class, not a dataclass: `delete`
    runs at every task teardown and the dataclasses module (with inspect) is a tenth of its imports."""

    __slots__ = ("action", "address", "bundle", "debug", "id", "namespace", "publish_binary", "version")

    def __init__(self, *, namespace: str = "", address: str = "", publish_binary: str = "", id: str = "",
                 bundle: str = "", debug: bool = False, version: bool = False, action: str = "") -> None:
        self.namespace = namespace
        self.address = address
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle
        self.debug = debug
        self.version = version
        self.action = action

    def __repr__(self) -> str:
        return "Flags(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOL_FLAGS = {"debug", "v", "version"}


def parse_flags(argv: list[str]) -> Flags:
    """`-namespace ns -id x start` (also --flag and -flag=value). Raises ShimStartError naming a bad flag."""
    f = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            f.action = argv[i] if i < len(argv) else ""
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            on = value.lower() not in ("false", "0") if eq else True
            if name == "debug":
                f.debug = on
            else:
                f.version = on
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    from pykata.shim.starterror import ShimStartError

                    raise ShimStartError(f"flag -{name} needs a value")
                value = argv[i]
            if name != "socket":
                setattr(f, name.replace("-", "_"), value)
        else:
            from pykata.shim.starterror import ShimStartError

            raise ShimStartError(f"unknown flag {arg!r}")
        i += 1
    return f
