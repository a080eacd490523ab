"""The Python API's arguments, checked at the door and generated from the settings' one declaration.

``with_settings(TrainConfig, "pretrain")`` gives an API function every training setting as a keyword argument
(its signature lists them, with their defaults, for ``help()`` and IDEs), gathers the ones given into one
validated ``TrainConfig`` (``train=`` may pass a whole one, which the keywords then override), and hands the
function that object. ``checked`` checks every other argument against its annotation. Either way a wrong type
is a ``TypeError`` and a value out of range a ``ValueError`` naming the parameter and what it expects (both are
``transferlab.UserError``), raised before anything runs, instead of a raw error from deep inside or, worse, a
string read character by character.

Only the simple annotations the API uses are checked (``str``, ``int``, ``float``, ``bool``, ``dict``,
``Path``, ``list[str]``, unions with ``None``); an annotation it cannot read is not checked.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import types
import typing
from pathlib import Path

from transferlab.config import setting_fields
from transferlab.errors import UserTypeError, UserValueError, suggest


def _resolve(annotation, namespace: dict):
    if isinstance(annotation, str):
        try:
            return eval(annotation, namespace)  # noqa: S307 - our own annotations, in our own module's namespace
        except Exception:  # noqa: BLE001 - a TYPE_CHECKING-only name (pd.DataFrame): not checked
            return None
    return annotation


def _accepts(value, annotation) -> bool:
    if annotation is None or annotation is inspect.Parameter.empty or annotation is typing.Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(_accepts(value, arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, origin) and all(_accepts(item, args[0]) for item in value) if args else \
            isinstance(value, origin)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is Path:
        return isinstance(value, (str, os.PathLike))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if Path in args and str in args:  # a path is already "str or Path"
            args = tuple(a for a in args if a is not str)
        return " or ".join(_describe(arg) for arg in args)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a {origin.__name__} of {_describe(args[0])}" if args else f"a {origin.__name__}"
    words = {type(None): "None", str: "str", int: "int", float: "float (a number)", bool: "bool", dict: "dict",
             Path: "a path"}
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_arguments(function, signature: inspect.Signature, bound: inspect.BoundArguments) -> None:
    """Every bound argument against its parameter's annotation; a mismatch is a UserTypeError."""
    namespace = getattr(function, "__globals__", {})
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        annotation = _resolve(parameter.annotation, namespace)
        if not _accepts(value, annotation):
            hint = ""
            lists = [a for a in typing.get_args(annotation) if typing.get_origin(a) in (list, tuple)]
            if isinstance(value, str) and lists:
                hint = f"; a single string is not a list: write {name}=[{value!r}]"
            raise UserTypeError(f"{function.__name__}(): {name} must be {_describe(annotation)}, got "
                                f"{type(value).__name__} {value!r}{hint}")


def _bind(function, signature: inspect.Signature, args, kwargs) -> inspect.BoundArguments:
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as exc:
        unknown = next((k for k in kwargs if k not in signature.parameters), None)
        hint = suggest(unknown, signature.parameters) if unknown else ""
        raise UserTypeError(f"{function.__name__}(): {exc}{hint}") from None


def checked(function):
    """Check ``function``'s arguments against its annotations before it runs (see the module doc)."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        check_arguments(function, signature, _bind(function, signature, args, kwargs))
        return function(*args, **kwargs)

    return wrapper


def with_settings(cls, command: str, into: str = "train"):
    """Give the decorated function ``cls``'s settings for ``command`` as keyword arguments.

    The function takes one keyword-only parameter ``into`` (e.g. ``train: TrainConfig | None = None``); the
    wrapper's signature has the settings in its place, then ``into`` itself, so ``pretrain(lr=0.01)``,
    ``pretrain(train=TrainConfig(lr=0.01))`` and ``pretrain(train=config, epochs=2)`` all work. The function
    receives the validated object."""
    settings = setting_fields(cls, command)

    def decorate(function):
        original = inspect.signature(function)
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.plain_default(),
                                       annotation=f"{f.kind.__name__}{' | None' if f.optional else ''}")
                     for f in settings]
        parameters = []
        for parameter in original.parameters.values():
            if parameter.name == into:
                parameters.extend(generated)
            parameters.append(parameter)
        signature = original.replace(parameters=parameters)
        names = {f.name for f in settings}
        others = original.replace(parameters=[p for p in parameters if p.name not in names])

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = _bind(function, signature, args, kwargs)
            given = {name: bound.arguments.pop(name) for name in list(bound.arguments) if name in names}
            check_arguments(function, others, bound)
            base = bound.arguments.pop(into, None)  # its type is checked above, by its annotation
            try:
                config = cls.from_values(given, base=base, style="arg")
            except (UserTypeError, UserValueError) as exc:
                raise type(exc)(f"{function.__name__}(): {exc}") from None
            return function(*bound.args, **bound.kwargs, **{into: config})

        wrapper.__signature__ = signature
        return wrapper

    return decorate
