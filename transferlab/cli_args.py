"""One list convention for the command line, applied before typer parses anything.

A multi-value option (``--sources``, ``--targets``, ``--attack``, ``--eps``, ``--select``,
``--select-targets``, ``--format``, ``--log``) takes its values in any mix of three spellings, which all mean the
same list:

    --eps 0.1,0.2 --eps 0.3          repeated, and comma-separated
    --sources A B C                  several values after one flag (commands without positional arguments)
    --attack fgsm,pgd

KEY=VALUE options (``-o``, ``--attack-opt``) are repeatable only: commas belong to their values
(``-o hidden=[256,128]``). Any other option takes one value, and giving it twice is an error rather than
"the last one wins" (click's default), which silently dropped input.
"""

from __future__ import annotations

import functools
import inspect
import typing
from enum import StrEnum

from transferlab.config import TRACKERS, choice, setting_fields
from transferlab.errors import UserError, UserValueError

LIST_OPTIONS = frozenset({"--sources", "--targets", "--attack", "--eps", "--select", "--select-targets", "--format",
                          "--log"})


def split_list(values, flag: str | None = None) -> list[str]:
    """['0.1,0.2', '0.3'] -> ['0.1', '0.2', '0.3']; a plain string is one item; empty items are dropped.

    With ``flag`` (a value the user typed), a value with no item in it (``--eps ''``) is an error rather than
    nothing, which would silently mean the default."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if flag is not None:
        for value in values:
            if not str(value).replace(",", "").strip():
                raise UserValueError(f"{flag} {value!r} is empty; give a value (see --help), or leave {flag} out "
                                     f"for the default")
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


# ------------------------------------------------------------------ options generated from settings
def enum_option(kind: type[StrEnum], default, flag: str, help: str):
    """A typer option for a ``StrEnum``: --help lists its words and shell completion offers them; a wrong word
    is the same one-line error as everywhere else (config.choice), case-insensitive."""
    import typer

    def parse(value):
        try:
            return choice(kind, value, flag)
        except UserError as exc:  # typer wraps a ValueError in its own "Invalid value ... Value error" line
            raise UserError(str(exc)) from None

    return typer.Option(default, flag, help=help, case_sensitive=False, parser=parse)


def _option(f):
    """The typer option of one setting field (config.SettingField); a dict setting is a repeatable NAME=VALUE."""
    import typer

    flag = f.meta.flag or f.flag
    if f.choices:
        return enum_option(f.kind, f.default, flag, f.meta.help)
    if f.kind is dict:
        return typer.Option(None, *flag.split(" "), help=f.meta.help)
    return typer.Option(f.default, *flag.split(" "), help=f.meta.help)


def number_pairs(items: list[str] | None, flag: str) -> dict[str, float] | None:
    """['accelerator_type:A100=0.001', 'fast_disk=1'] -> {name: number}; None when none are given. A name may
    hold ':' but not '='; a malformed item, a value that is no number, or a name given twice is a one-line error."""
    if not items:
        return None
    pairs: dict[str, float] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserValueError(f"{flag} {item!r} is not NAME=VALUE (e.g. {flag} accelerator_type:A100=0.001)")
        if name in pairs:
            raise UserValueError(f"{flag} gives {name} twice; keep one")
        try:
            pairs[name] = float(value)
        except ValueError:
            raise UserValueError(f"{flag} {item!r}: {value.strip()!r} is not a number") from None
    return pairs


def _annotation(f):
    if f.kind is dict:  # typer reads it as a repeatable option; the wrapper makes it a dict
        return typing.Optional[typing.List[str]]
    return typing.Optional[f.kind] if f.optional else f.kind


def setting_options(cls, command: str, into: str):
    """Generate a typer command's options from ``cls``'s settings for ``command`` (config.setting): the
    decorated command has one parameter ``into`` (``train: TrainConfig``) where the options go; it receives
    them as one validated ``cls`` object, so an out-of-range value is a one-line error naming its flag before
    the command's body runs. typer reads the signature and type hints this sets."""
    settings = setting_fields(cls, command)
    names = {f.name for f in settings}

    def decorate(function):
        original = inspect.signature(function)
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_option(f),
                                       annotation=_annotation(f)) for f in settings]
        parameters = []
        for parameter in original.parameters.values():
            if parameter.name == into:
                parameters.extend(generated)
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        pairs = {f.name: f.meta.flag or f.flag for f in settings if f.kind is dict}

        @functools.wraps(function)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            values.update({name: number_pairs(values[name], flag) for name, flag in pairs.items()})
            return function(**kwargs, **{into: cls(**values).validate()})

        wrapper.__signature__ = original.replace(parameters=parameters)
        annotations = {k: v for k, v in function.__annotations__.items() if k != into}
        wrapper.__annotations__ = {**annotations, **{p.name: p.annotation for p in generated}}
        # __wrapped__ stays: get_type_hints evaluates the command's own (string) annotations in its module
        return wrapper

    return decorate


def _command(app, argv: list[str]):
    """The click command ``argv`` names (None for the group itself or an unknown name)."""
    import typer.main

    group = typer.main.get_command(app)
    for token in argv:
        if token.startswith("-"):
            continue  # group-level options such as --version
        return getattr(group, "commands", {}).get(token), argv.index(token)
    return None, len(argv)


def list_choices(name: str) -> frozenset[str]:
    """The fixed words a list option takes, so they can be gathered even beside a positional argument
    (empty for options whose values are open)."""
    if name == "--format":
        # Not at the top: the report package imports pandas and matplotlib, which only 'report' needs.
        from transferlab.report.study_report import FORMATS

        return frozenset(FORMATS)
    if name == "--log":
        return frozenset(TRACKERS)
    return frozenset()


def normalise_argv(app, argv: list[str]) -> list[str]:
    """Spread ``--opt A B C`` into ``--opt A --opt B --opt C`` for list options of commands that take no
    positional argument, and refuse a single-value option given twice."""
    command, at = _command(app, argv)
    if command is None:
        return list(argv)
    params = [p for p in command.params if p.param_type_name == "option"]
    positional = any(p.param_type_name == "argument" for p in command.params)
    by_name = {name: p for p in params for name in list(p.opts) + list(p.secondary_opts)}
    head, tail = list(argv[: at + 1]), list(argv[at + 1:])
    out: list[str] = []
    seen: dict[str, str] = {}  # parameter -> the spelling it was first given as
    i = 0
    while i < len(tail):
        token = tail[i]
        if token == "--":
            out.extend(tail[i:])
            break
        name = token.split("=", 1)[0] if token.startswith("--") else token
        param = by_name.get(name)
        if param is None:
            out.append(token)
            i += 1
            continue
        takes_value = not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        if not getattr(param, "multiple", False) and takes_value:
            if param.name in seen:
                raise UserError(f"{name} given twice; it takes one value (keep one {seen[param.name]})")
            seen[param.name] = name
        out.append(token)
        i += 1
        if not takes_value or "=" in token:
            continue
        if i < len(tail):  # the option's own value, whatever it looks like
            out.append(tail[i])
            i += 1
        if name in LIST_OPTIONS and getattr(param, "multiple", False):
            # Beside a positional argument only known words can follow the flag (report DIR --format md html).
            known = list_choices(name) if positional else frozenset()
            while i < len(tail) and not tail[i].startswith("-") and (not positional or tail[i] in known):
                out.extend([name, tail[i]])
                i += 1
    return head + out
