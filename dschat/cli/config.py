"""--config FILE.yaml|json for every step and e2e_rlhf.py, the help format, and dschat_args.json.

A config file sets flag values (keys: the flags' names, with or without the leading "--", "-" or "_" alike);
the command line overrides it. A key that is no flag of the command is an error naming the key and the file.
Every step writes the flags it ran with to <output_dir>/dschat_args.json (plus `version` and `commit`, which
--config accepts and ignores), so `--config <output_dir>/dschat_args.json` repeats the run.

Kept free of torch/deepspeed imports (e2e_rlhf.py --help stays instant); PyYAML is imported only for YAML files.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from dschat.runtime.errors import FlagError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding dschat/
ARGS_FILE = "dschat_args.json"
RECORD_KEYS = ("version", "commit")  # written beside the flags, accepted and ignored by --config
# Not written: the launcher's per-process rank, the config file itself, DeepSpeed's compatibility switches, and
# --resume (a repeated run starts over; it continues a checkpoint only when asked again).
NOT_RECORDED = ("help", "config", "local_rank", "deepspeed", "deepspeed_config", "deepscale", "deepscale_config",
                "resume")
# (flag, flag): given both (on the command line or in the config file, at a value other than the default) is refused.
EXCLUSIVE = (("warmup_ratio", "num_warmup_steps"),
             *((f"{role}lora_target_modules", f"{role}lora_module_name") for role in ("", "actor_", "critic_")))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every flag's default after its help: "(default: X)".

    Left out where it says nothing or would mislead: switches (store_true: off unless given), defaults of None
    or "" (the help says what happens then) and help that already states its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or action.default in (None, "", argparse.SUPPRESS) \
                or isinstance(action.default, bool) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def package_version() -> str:
    """dschat.__version__ (the code that runs, whatever is installed)."""
    import dschat

    return getattr(dschat, "__version__", "unknown")


def git_commit(root: Path = PACKAGE_ROOT) -> str | None:
    """The checkout's commit (with "-dirty" when tracked files changed), or None outside a git checkout."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, capture_output=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def flag_keys(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a config file may use for a flag: its dest and its long option names, "-" and "_" alike."""
    keys: dict[str, argparse.Action] = {}
    for action in p._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        names = {action.dest, *(o.lstrip("-") for o in action.option_strings if o.startswith("--"))}
        for name in names:
            keys[name] = keys[name.replace("-", "_")] = action
    return keys


def load_config(path: str) -> dict[str, Any]:
    """A config file's mapping of flag names to values (.json, or .yaml/.yml); errors name the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FlagError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError: one line naming the file
        raise FlagError(f"--config {path}: not valid {'YAML' if file.suffix.lower() in ('.yaml', '.yml') else 'JSON'}"
                        f" ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlagError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _number(action: argparse.Action, value: Any) -> Any:
    """A config value through the flag's type, as the command line would convert it."""
    kind = action.type
    if isinstance(value, bool) or kind is None or kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `actor-zero-stage: 3` as a number; the flag takes text
        if not isinstance(value, str):
            raise TypeError(f"expected text, got {value!r}")
        return value
    if isinstance(value, str):
        return kind(value)
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind is int and isinstance(value, int):
        return value
    if callable(kind) and kind not in (int, float):
        return kind(value)
    raise TypeError(f"expected {getattr(kind, '__name__', kind)}, got {value!r}")


def convert(action: argparse.Action, value: Any) -> Any:
    """Check and convert one config value for `action` (raises ValueError/TypeError with the reason)."""
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if many:
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ValueError("expected at least one value")
    elif isinstance(value, (list, dict)):
        raise TypeError(f"expected one value, got {value!r}")
    else:
        items = [value]
    out = [_number(action, v) for v in items]
    if action.choices is not None:
        for v in out:
            if v not in action.choices:
                raise ValueError(f"{v!r} is not one of {', '.join(map(str, action.choices))}")
    return out if many else out[0]


def config_values(p: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The config file's values by dest, checked against the parser's flags (unknown key: error naming it)."""
    keys = flag_keys(p)
    values: dict[str, Any] = {}
    for key, value in load_config(path).items():
        name = str(key).lstrip("-")
        if name in RECORD_KEYS:
            continue
        action = keys.get(name) or keys.get(name.replace("-", "_"))
        if action is None:
            close = difflib.get_close_matches(name, sorted(keys), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            why = "a config file cannot name another" if name == "config" else "not a flag of this command"
            raise FlagError(f"--config {path}: unknown key '{key}'{hint}: {why}")
        try:
            values[action.dest] = convert(action, value)
        except (TypeError, ValueError) as err:
            raise FlagError(f"--config {path}: key '{key}': {err}") from None
    return values


def explicit_dests(p: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The flags `argv` gives explicitly (parsed a second time into a namespace pre-filled with a marker)."""
    marker = object()
    ns = argparse.Namespace(**{a.dest: marker for a in p._actions if a.dest != "help"})
    p.parse_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not marker}


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """Add --config FILE to a parser (once)."""
    if not any(a.dest == "config" for a in p._actions):
        p.add_argument("--config", type=str, default=None, metavar="FILE",
                       help="A .yaml/.yml or .json file of flag values (keys: flag names); flags given on the "
                            "command line override it. An output folder's dschat_args.json repeats its run.")


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv` with --config FILE's values as defaults (the command line wins); refuse EXCLUSIVE pairs."""
    add_config_arg(p)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    values = config_values(p, known.config) if known.config else {}
    defaults = {a.dest: a.default for a in p._actions}
    p.set_defaults(**values)
    args = p.parse_args(argv)
    given = explicit_dests(p, argv) | {k for k, v in values.items() if v != defaults.get(k)}
    for a, b in EXCLUSIVE:
        if a in given and b in given:
            raise FlagError(f"--{a} and --{b} exclude each other (each sets the same thing): give one")
    return args


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flag values worth repeating a run with: everything parsed but NOT_RECORDED, JSON-safe."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in NOT_RECORDED or key.startswith("_"):
            continue
        out[key] = value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)
    return out


def write_args(flags: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write <folder>/dschat_args.json: the flags plus the package version and git commit; returns the path."""
    path = Path(folder) / ARGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"version": package_version(), "commit": git_commit(), **flags}
    tmp = path.with_name(f".{ARGS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path
