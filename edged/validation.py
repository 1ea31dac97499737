"""Checking plain data (parsed YAML, a JSON command) against declared settings.

Settings are declared once, as msgspec ``Struct`` classes (``Section`` below) whose fields carry
their type, bounds, default, description and reload behaviour (``setting``). msgspec checks each
value against its field's declaration; this module walks the data so that every problem of a
document is reported at once, one ``path: problem`` line each, in edged's own words, and derives
the JSON Schema and the reference tables of docs/config.md from the same declarations.

Why msgspec and not pydantic: docs/architecture.md ("Configuration") has the figures.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import msgspec.inspect as mi

from edged.errors import EdgedError, did_you_mean

# How a changed setting takes effect on reload (SIGHUP): applied to the running stream
# ("live"), by restarting the stream with everything that depends on it rebuilt ("stream"),
# or only by restarting edged ("daemon": a reload keeps the running value and says so).
Reload = Literal["live", "stream", "daemon"]


def setting(description: str, reload: Reload = "stream", **extra: Any) -> msgspec.Meta:
    """A field's documentation: what it means and how a reload applies it. ``extra`` holds
    wording for problems (``error``: the text after a value that does not match ``pattern``)."""
    return msgspec.Meta(description=description, extra={"reload": reload, **extra})


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One mapping of the configuration. Subclasses declare fields, and may declare:

    - ``shorthand``: the field a plain string stands for (``source: /dev/video0``);
    - ``refused``: keys that are not fields, with the reason given when one is used;
    - ``resolved``: fields filled by the resolve step, never read from the file;
    - ``rules()``: checks across fields (skipped where a field they read has a problem).
    """

    shorthand: ClassVar[str | None] = None
    refused: ClassVar[Mapping[str, str]] = {}
    resolved: ClassVar[frozenset[str]] = frozenset()

    def rules(self) -> Iterable[tuple[str, str]]:
        """Problems across fields, as (field path relative to this section, problem)."""
        return ()


class Problems(list[str]):
    """``path: problem`` lines, in the order found."""

    def add(self, path: str, problem: str) -> None:
        self.append(f"{path or '<top>'}: {problem}")


def join(path: str, key: object) -> str:
    """``path.key`` (``key`` at the top, ``path`` for an empty key); a key that would not
    read as one on a line (a newline, a control character) is quoted: ``path['a\\n']``."""
    text = str(key)
    if not text.isprintable():
        return f"{path}[{text!r}]"
    return f"{path}.{text}" if path and text != "" else path or text


def convert(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    """``value`` checked against the declared type ``tp`` (a ``Section`` builds with every
    problem added to ``problems``). A bad value becomes None and checking goes on."""
    inner, _ = _unwrap(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return convert(_arm_for([a for a in args if a is not type(None)], value), value, path,
                       problems)
    if isinstance(inner, type) and issubclass(inner, Section):
        return build(inner, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.add(path, f"must be a list, got {describe(value)}")
            return None
        length = _length_problem(tp, len(value))
        if length:
            problems.add(path, length)
            return None
        return [convert(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.add(path, f"must be a mapping, got {describe(value)}")
            return None
        converted = {}
        for k, v in value.items():
            key = convert(args[0], k, join(path, k), problems) if args[0] is not str else str(k)
            converted[key] = convert(args[1], v, join(path, k), problems)
        return converted
    try:
        return msgspec.convert(value, tp, strict=True)
    except msgspec.ValidationError:
        problems.add(path, _scalar_problem(tp, value))
        return None


def _length_problem(tp: Any, length: int) -> str | None:
    """Why a list of ``length`` items is too short or too long for ``tp``, or None."""
    info = mi.type_info(tp)
    _, extra = _unwrap(tp)
    info = info.type if isinstance(info, mi.Metadata) else info
    low, high = getattr(info, "min_length", None), getattr(info, "max_length", None)
    if (low is None or length >= low) and (high is None or length <= high):
        return None
    if "error" in extra:
        return extra["error"]
    if low == high:
        return f"must have exactly {low} items, got {length}"
    return f"must have {low}..{high} items, got {length}" if high is not None \
        else f"must have at least {low} items, got {length}"


def _arm_for(arms: list[Any], value: Any) -> Any:
    """The arm of a union that a value of this shape belongs to: a list to the list arm, a
    mapping to a section or mapping arm, anything else to the first other arm."""
    def shape(arm: Any) -> type | None:
        inner, _ = _unwrap(arm)
        if typing.get_origin(inner) is list:
            return list
        is_section = isinstance(inner, type) and issubclass(inner, Section)
        return dict if is_section or typing.get_origin(inner) is dict else None

    wanted = list if isinstance(value, list) else dict if isinstance(value, Mapping) else None
    return next((arm for arm in arms if shape(arm) is wanted), arms[0])


def build(cls: type[Section], data: Any, path: str, problems: Problems) -> Section | None:
    """A ``cls`` from a mapping, every bad or unknown key reported; fields with problems are
    None in the result (so that later checks can go on): the caller must not use it when
    ``problems`` is not empty."""
    if cls.shorthand and isinstance(data, str):
        data = {cls.shorthand: data}
    if not isinstance(data, Mapping):
        expected = f"a {cls.shorthand} or a mapping" if cls.shorthand else "a mapping"
        problems.add(path, f"must be {expected}, got {describe(data)}")
        return None
    fields = {f.name: f for f in msgspec.structs.fields(cls) if f.name not in cls.resolved}
    values: dict[str, Any] = {}
    for key, value in data.items():
        key_path = join(path, key)
        if key in cls.refused:
            problems.add(key_path, cls.refused[key])
        elif key not in fields:
            problems.add(key_path, f"unknown key{did_you_mean(key, fields)}")
        else:
            values[key] = convert(fields[key].type, value, key_path, problems)
    for name, f in fields.items():
        if name not in data and f.required:
            problems.add(join(path, name), "required")
            values[name] = None
    obj = cls(**values)
    try:
        for where, problem in obj.rules():
            problems.add(join(path, where), problem)
    except (TypeError, AttributeError):
        pass  # a field the rule reads is None: its problem is already reported
    return obj


def check_value(cls: type[Section], name: str, value: Any, path: str) -> Any:
    """``value`` checked against field ``name`` of ``cls`` (as a file's value would be);
    raises ``EdgedError`` ``path: problem`` on the first problem."""
    field = next(f for f in msgspec.structs.fields(cls) if f.name == name)
    problems = Problems()
    converted = convert(field.type, value, path, problems)
    if problems:
        raise EdgedError(problems[0])
    return converted


# ---------------------------------------------------------------------------------------------
# Wording


def describe(value: Any) -> str:
    """A value as a problem line names it: ``text 'x'``, ``a list``, ``nothing``, ``1.5``."""
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "an empty string" if value == "" else f"text {value!r}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


_KINDS: dict[type, tuple[str, Any]] = {
    mi.BoolType: ("true or false", lambda v: isinstance(v, bool)),
    mi.IntType: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    mi.FloatType: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    mi.StrType: ("a string", lambda v: isinstance(v, str)),
}


def _unwrap(tp: Any) -> tuple[Any, dict[str, Any]]:
    """The type inside ``Annotated`` layers, and their metadata's ``extra`` merged."""
    extra: dict[str, Any] = {}
    while typing.get_origin(tp) is Annotated:
        for meta in tp.__metadata__:
            extra.update(getattr(meta, "extra", None) or {})
        tp = tp.__origin__
    return tp, extra


def _scalar_problem(tp: Any, value: Any) -> str:
    """Why ``value`` is not a valid ``tp`` (a scalar or ``Literal`` type), in edged's words."""
    info = mi.type_info(tp)
    inner, extra = _unwrap(tp)
    if isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.LiteralType):
        choices = [str(v) for v in typing.get_args(inner)]  # in declaration order
        return f"must be one of {', '.join(choices)}{did_you_mean(value, choices)}"
    name, fits = _KINDS[type(info)]
    if not fits(value) or (isinstance(info, mi.StrType) and value == ""):
        return f"must be {name}, got {describe(value)}"
    if isinstance(info, mi.StrType):
        if info.max_length is not None and len(value) > info.max_length:
            return f"must be at most {info.max_length} characters"
        return f"{value!r} {extra.get('error', 'is not allowed')}"
    return f"must be {bounds(info)}"


def bounds(info: mi.IntType | mi.FloatType) -> str:
    """A number type's range as users read it: ``1..65535``, ``> 0 and <= 3600``."""
    def text(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    low = text(info.ge) if info.ge is not None else f"> {text(info.gt)}" if info.gt is not None \
        else ""
    high = text(info.le) if info.le is not None else f"< {text(info.lt)}" if info.lt is not None \
        else ""
    if info.ge is not None and info.le is not None:
        return f"{low}..{high}"
    if low and high:
        return f"{low if info.gt is not None else '>= ' + low} and " \
               f"{high if info.lt is not None else '<= ' + high}"
    if low:
        return low if info.gt is not None else f">= {low}"
    return high if info.lt is not None else f"<= {high}"


# ---------------------------------------------------------------------------------------------
# JSON Schema and reference tables


def json_schema(cls: type[Section], title: str) -> dict[str, Any]:
    """The JSON Schema of ``cls`` as a file gives it: resolved fields left out, shorthands
    accepted."""
    schema = msgspec.json.schema(cls)
    defs = schema["$defs"]
    sections = {section.__name__: section for section in _sections(cls)}
    for name, section in sections.items():
        for field in section.resolved:
            defs[name]["properties"].pop(field, None)
    for entry in defs.values():
        for prop in entry.get("properties", {}).values():
            _accept_shorthands(prop, defs, sections)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
            "description": (cls.__doc__ or "").strip().splitlines()[0], **schema}


def _accept_shorthands(prop: dict[str, Any], defs: dict[str, Any],
                       sections: dict[str, type[Section]]) -> None:
    """Where ``prop`` refers to a section with a shorthand, accept the plain string too."""
    for arm in prop.get("anyOf", []):
        _accept_shorthands(arm, defs, sections)
    if "items" in prop:
        _accept_shorthands(prop["items"], defs, sections)
    ref = prop.get("$ref")
    section = sections.get(ref.rsplit("/", 1)[-1]) if ref else None
    if section is not None and section.shorthand:
        plain = defs[section.__name__]["properties"][section.shorthand]
        del prop["$ref"]
        prop["anyOf"] = [{k: v for k, v in plain.items() if k != "description"}, {"$ref": ref}]


def _sections(cls: type[Section]) -> list[type[Section]]:
    """``cls`` and every section reachable from its fields, each once."""
    seen: list[type[Section]] = []

    def visit(tp: Any) -> None:
        inner, _ = _unwrap(tp)
        if isinstance(inner, type) and issubclass(inner, Section):
            if inner in seen:
                return
            seen.append(inner)
            for f in msgspec.structs.fields(inner):
                visit(f.type)
        for arg in typing.get_args(inner):
            visit(arg)

    visit(cls)
    return seen


def reload_of(cls: type[Section], name: str) -> Reload:
    """How a change of field ``name`` of ``cls`` takes effect on reload."""
    field = next(f for f in msgspec.structs.fields(cls) if f.name == name)
    return _unwrap(field.type)[1].get("reload", "stream")


def settings_table(cls: type[Section]) -> str:
    """The reference table of ``cls``'s fields for docs/config.md: key, type and bounds,
    default, reload, meaning."""
    rows = ["| key | value | default | on reload | meaning |", "|---|---|---|---|---|"]
    for f in msgspec.structs.fields(cls):
        if f.name in cls.resolved:
            continue
        info = mi.type_info(f.type)
        description = info.extra_json_schema.get("description", "") \
            if isinstance(info, mi.Metadata) and info.extra_json_schema else ""
        rows.append(f"| `{f.name}` | {_type_text(info, f.type)} | {_default_text(f)} | "
                    f"{reload_of(cls, f.name)} | {description} |")
    return "\n".join(rows)


def _type_text(info: Any, tp: Any) -> str:
    """How the reference names a type: ``number 0..1``, ``list of string``, ``mapping``."""
    if isinstance(info, mi.Metadata):
        return _type_text(info.type, tp)
    if isinstance(info, mi.UnionType):
        return " or ".join(_type_text(t, tp) for t in info.types
                           if not isinstance(t, mi.NoneType))
    if isinstance(info, mi.LiteralType):
        return ", ".join(f"`{v}`" for v in _literal_values(tp))
    if isinstance(info, mi.IntType | mi.FloatType):
        kind = "integer" if isinstance(info, mi.IntType) else "number"
        has_bounds = any(b is not None for b in (info.ge, info.gt, info.le, info.lt))
        return f"{kind} {bounds(info)}" if has_bounds else kind
    if isinstance(info, mi.StructType):
        section = info.cls
        return f"{section.shorthand} or a mapping" if section.shorthand else "mapping"
    if isinstance(info, mi.ListType):
        return f"list of {_type_text(info.item_type, tp)}"
    if isinstance(info, mi.DictType):
        return f"mapping to {_type_text(info.value_type, tp)}"
    return {mi.BoolType: "true/false", mi.StrType: "string"}.get(type(info), type(info).__name__)


def _literal_values(tp: Any) -> tuple[Any, ...]:
    """The values of the first ``Literal`` inside ``tp``, in declaration order."""
    inner, _ = _unwrap(tp)
    if typing.get_origin(inner) is Literal:
        return typing.get_args(inner)
    return next((values for arg in typing.get_args(inner) if (values := _literal_values(arg))),
                ())


def _default_text(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    factory = field.default_factory
    if factory in (dict, list):
        return f"`{factory()}`"
    if factory is not msgspec.NODEFAULT:
        return (factory.__doc__ or "").strip().splitlines()[0]
    default = field.default
    if default is None:
        return "none"
    if isinstance(default, Section):
        return "(below)"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"
