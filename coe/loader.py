"""Load ``experts.yaml``: ``yaml.safe_load`` semantics, pydantic validation, and
errors an operator can act on: ``experts.yaml:14: experts[2].backend: unknown backend 'gpu-1'``.

Lines come from the YAML node tree, walked along the error's location: the line of
the key for a value, of the item for a list entry, and of the enclosing key or item
for a field that is missing. Cross-references (an expert's backend exists, names are
unique) are checked here because they need the whole file, and so are the names of
registered strategies (``router.strategy`` in ``routers.ROUTERS``, ``pipeline.strategy``
in ``coe.aggregate.AGGREGATORS``), so that ``coe.config`` imports neither. Every problem
in the file is reported at once, sorted by line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from coe.aggregate import AGGREGATORS
from coe.config import BackendConfig, ExpertConfig, RegistryConfig, unknown_name
from coe.errors import ConfigError
from routers import ROUTERS

Loc = Sequence[str | int]

_MERGE_TAG = "tag:yaml.org,2002:merge"  # the tag a "<<" key resolves to
# pydantic's schema tags in an error's ``loc``: union members ("int", "str"),
# validators ("function-after[_check_name(), str]"), dict keys ("[key]").
_TAG_RE = re.compile(r"^[A-Za-z_][\w-]*(\[.*\])?$|^\[.*\]$", re.DOTALL)
_MISSING = object()


def format_loc(loc: Loc) -> str:
    """``("experts", 2, "backend")`` -> ``experts[2].backend``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def clean_loc(loc: Sequence[str | int], data: Any, *, missing: bool = False) -> list[str | int]:
    """A pydantic error location as a path into ``data``: schema tags dropped, mapping keys as strings.

    A part is a real key when the data has it (or, with ``missing``, when it is the
    field that is missing); anything else is a tag that pydantic added for a union
    member or a validator. Walking the data keeps a key that merely looks like a tag.
    """
    out: list[str | int] = []
    current: Any = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, Mapping) and part in current:
            out.append(str(part))
            current = current[part]
        elif isinstance(part, int) and not isinstance(part, bool) and isinstance(current, list):
            out.append(part)
            current = current[part] if 0 <= part < len(current) else _MISSING
        elif isinstance(part, str) and _TAG_RE.match(part) and not (last and missing):
            continue
        else:
            out.append(part)
            current = _MISSING
    return out


def _find_key(node: yaml.MappingNode, key: str, seen: set[int]) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key, value) nodes for ``key``: the last one written wins, as with ``safe_load``;
    keys merged in with ``<<`` count when the mapping does not set the key itself."""
    found: tuple[yaml.Node, yaml.Node] | None = None
    merged: list[yaml.Node] = []
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key and k.tag != _MERGE_TAG:
            found = (k, v)
        elif isinstance(k, yaml.ScalarNode) and k.tag == _MERGE_TAG:
            merged.extend(v.value if isinstance(v, yaml.SequenceNode) else [v])
    if found is not None or id(node) in seen:
        return found
    seen.add(id(node))
    for source in reversed(merged):  # the first source listed wins
        if isinstance(source, yaml.MappingNode):
            hit = _find_key(source, key, seen)
            if hit is not None:
                found = hit
    return found


def _line_of(node: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line for ``loc``: the key's line for a mapping entry, the item's for a list entry;
    where the path leaves the file (a missing field), the line of the deepest part that exists."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = _find_key(node, str(part), set())
            if hit is None:
                break
            key, node = hit
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _duplicate_keys(root: yaml.Node | None) -> list[tuple[Loc, str]]:
    """Keys written twice in one mapping (``safe_load`` would silently keep the last)."""
    problems: list[tuple[Loc, str]] = []
    visited: set[int] = set()

    def walk(node: yaml.Node, loc: tuple[str | int, ...]) -> None:
        if id(node) in visited:  # aliases share nodes; an anchor may even contain itself
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    continue
                if key.tag != _MERGE_TAG:
                    ident = (key.tag, key.value)
                    if ident in first:
                        msg = f"duplicate key {key.value!r} (first on line {first[ident]})"
                        problems.append(((*loc, key.value), msg))
                    first.setdefault(ident, key.start_mark.line + 1)
                walk(value, (*loc, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))

    if root is not None:
        walk(root, ())
    return problems


def validation_problems(exc: ValidationError, data: Any) -> list[tuple[list[str | int], str]]:
    """Each pydantic error as (location in ``data``, message an operator can read)."""
    problems: list[tuple[list[str | int], str]] = []
    for err in exc.errors(include_url=False):
        loc = clean_loc(err["loc"], data, missing=err["type"] == "missing")
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden" and loc:
            msg = f"unknown key {str(loc[-1])!r}"
        elif err["type"] == "path_type":
            msg = "Input should be a valid path"
        problems.append((loc, msg))
    return problems


def cross_check(cfg: RegistryConfig) -> list[tuple[Loc, str]]:
    """Rules that need the whole registry; each problem with its location."""
    return _cross_problems(
        names=[(i, e.name) for i, e in enumerate(cfg.experts)],
        experts=list(enumerate(cfg.experts)),
        backends=dict(cfg.backends),
        router_refs=cfg.router.expert_refs(),
    ) + _strategy_problems(cfg.router.strategy, cfg.pipeline.strategy)


def _strategy_problems(router: object, pipeline: object) -> list[tuple[Loc, str]]:
    """``router.strategy`` and ``pipeline.strategy`` name entries of the explicit registries;
    a value that is not a string is the schema's to report."""
    problems: list[tuple[Loc, str]] = []
    for loc, value, known, what in ((("router", "strategy"), router, ROUTERS, "router"),
                                    (("pipeline", "strategy"), pipeline, AGGREGATORS, "strategy")):
        problem = unknown_name(value, known, what) if isinstance(value, str) else None
        if problem is not None:
            problems.append((loc, problem))
    return problems


def check_expert(expert: ExpertConfig, cfg: RegistryConfig) -> list[tuple[Loc, str]]:
    """An expert's references to the rest of the registry (used for file and API experts alike)."""
    return _check_expert(expert, cfg.backends)


def _check_expert(
    expert: ExpertConfig, backends: Mapping[str, BackendConfig | None]
) -> list[tuple[Loc, str]]:
    """As ``check_expert``; a backend mapped to ``None`` is declared but itself invalid (not checked)."""
    if expert.backend not in backends:
        known = ", ".join(sorted(backends)) or "none declared"
        return [(("backend",), f"unknown backend {expert.backend!r} (known: {known})")]
    backend = backends[expert.backend]
    if backend is None:
        return []
    problems: list[tuple[Loc, str]] = []
    launch = backend.launch
    if launch is not None:
        served = launch.served_name or launch.model.name
        if expert.model != served:
            msg = f"backend {expert.backend!r} serves {served!r}, not {expert.model!r}"
            problems.append((("model",), msg))
        if expert.adapter is not None and not launch.enables_lora():
            problems.append((("adapter",), f"backend {expert.backend!r} is launched without LoRA support"))
    return problems


def _cross_problems(
    *,
    names: Sequence[tuple[int, str]],
    experts: Sequence[tuple[int, ExpertConfig]],
    backends: Mapping[str, BackendConfig | None] | None,
    router_refs: Mapping[tuple[str, ...], str],
) -> list[tuple[Loc, str]]:
    """``names``: every expert's name by index; ``experts``: those that are valid;
    ``backends``: ``None`` when the section itself is invalid (references are not checked)."""
    problems: list[tuple[Loc, str]] = []
    seen: dict[str, int] = {}
    for i, name in names:
        if name in seen:
            msg = f"duplicate expert name {name!r} (also experts[{seen[name]}])"
            problems.append((("experts", i, "name"), msg))
        seen.setdefault(name, i)
    if backends is not None:
        for i, expert in experts:
            problems.extend((("experts", i, *loc), msg) for loc, msg in _check_expert(expert, backends))
    for loc, ref in router_refs.items():
        if ref not in seen:
            problems.append((("router", *loc), f"unknown expert {ref!r}"))
    return problems


def _partial_cross_check(data: Mapping[str, Any], base: Path) -> list[tuple[Loc, str]]:
    """``cross_check`` for a file that failed validation: the parts that are valid on their own."""
    raw_backends = data.get("backends", {})
    backends: dict[str, BackendConfig | None] | None = None
    if isinstance(raw_backends, Mapping):
        backends = {}
        for name, raw in raw_backends.items():
            try:
                backends[str(name)] = _resolve_backend(str(name), BackendConfig.model_validate(raw), base)
            except ValidationError:
                backends[str(name)] = None
    raw_experts = data.get("experts", [])
    names: list[tuple[int, str]] = []
    experts: list[tuple[int, ExpertConfig]] = []
    dangling: list[tuple[int, str]] = []  # backend names used by experts that are invalid for other reasons
    if isinstance(raw_experts, list):
        for i, raw in enumerate(raw_experts):
            if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
                names.append((i, raw["name"]))
            try:
                experts.append((i, ExpertConfig.model_validate(raw)))
            except ValidationError:
                ref = raw.get("backend") if isinstance(raw, Mapping) else None
                if isinstance(ref, str):
                    dangling.append((i, ref))
    router = data.get("router")
    refs: dict[tuple[str, ...], str] = {}
    if isinstance(router, Mapping) and isinstance(raw_experts, list):  # else nothing to compare with
        for key in ("default_expert", "generalist", "aggregator"):
            if isinstance(router.get(key), str):
                refs[(key,)] = router[key]
        skills = router.get("skills")
        if isinstance(skills, Mapping) and isinstance(skills.get("annotator"), str):
            refs[("skills", "annotator")] = skills["annotator"]
    problems = _cross_problems(names=names, experts=experts, backends=backends, router_refs=refs)
    pipeline = data.get("pipeline")
    problems.extend(_strategy_problems(router.get("strategy") if isinstance(router, Mapping) else None,
                                       pipeline.get("strategy") if isinstance(pipeline, Mapping) else None))
    if backends is not None:
        known = ", ".join(sorted(backends)) or "none declared"
        problems.extend((("experts", i, "backend"), f"unknown backend {ref!r} (known: {known})")
                        for i, ref in dangling if ref not in backends)
    return problems


def _resolve(path: Path, base: Path) -> Path:
    """Absolute and normalised (``..`` removed) without following symlinks: a model folder's
    name is its default served name, so a link must keep its own name."""
    path = path.expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _resolve_backend(name: str, backend: BackendConfig, base: Path) -> BackendConfig:
    backend.adapter_roots = [_resolve(p, base) for p in backend.adapter_roots]
    launch = backend.launch
    if launch is not None:
        launch.model = _resolve(launch.model, base)
        for module in launch.lora_modules:
            module.path = _resolve(module.path, base)
        launch.log_file = _resolve(launch.log_file or Path(".coe/logs") / f"{name}.log", base)
    return backend


def resolve_paths(cfg: RegistryConfig, base: Path) -> RegistryConfig:
    """Make every path in the registry absolute, relative ones against ``base`` (the file's folder)."""
    base = Path(os.path.abspath(base))
    for name, backend in cfg.backends.items():
        _resolve_backend(name, backend, base)
    for expert in cfg.experts:
        if expert.adapter is not None and expert.adapter.path is not None:
            expert.adapter.path = _resolve(expert.adapter.path, base)
    cfg.rag.folder = _resolve(cfg.rag.folder or Path(".coe/rag"), base)
    router = cfg.router
    router.artifact = _resolve(router.artifact or Path(".coe/router"), base)
    if router.data is not None:
        router.data = _resolve(router.data, base)
    router.extra_data = [_resolve(p, base) for p in router.extra_data]
    if router.profiles is not None:
        router.profiles = _resolve(router.profiles, base)
    elif (base / ".coe" / "profiles.json").exists():
        router.profiles = base / ".coe" / "profiles.json"
    return cfg


def _yaml_error(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context:
        context_mark = getattr(exc, "context_mark", None)
        problem += f" ({context} on line {context_mark.line + 1})" if context_mark else f" ({context})"
    return f"{where}: invalid YAML: {problem}"


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any, list[tuple[Loc, str]]]:
    """The node tree (for lines), the data ``yaml.safe_load`` would give, and the duplicate keys,
    from one parse. Constructing the data inlines ``<<`` merges into the tree, so duplicates
    are looked for before."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        duplicates = _duplicate_keys(root)
        data: Any = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, source)]) from exc
    finally:
        loader.dispose()
    return root, data, duplicates


def parse_registry(text: str, source: str, base: Path) -> RegistryConfig:
    """Validate YAML text; raise ``ConfigError`` listing every problem as ``source:line: field: message``.

    An empty file (or one with only comments) is an empty registry.
    """
    base = Path(os.path.abspath(base))
    root, data, duplicates = _compose(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise ConfigError(
            [f"{source}:{line}: the file must be a mapping with keys like 'backends' and 'experts', "
             f"not a {type(data).__name__}"]
        )

    def fmt(loc: Loc, msg: str) -> tuple[int, str]:
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        return line or 0, f"{where}: {format_loc(loc)}: {msg}"

    problems: list[tuple[Loc, str]] = list(duplicates)
    cfg: RegistryConfig | None = None
    try:
        cfg = RegistryConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, data))
    if cfg is not None:
        cfg = resolve_paths(cfg, base)
        problems.extend(cross_check(cfg))
    else:
        problems.extend(_partial_cross_check(data, base))
    if problems or cfg is None:
        lines = sorted((fmt(loc, msg) for loc, msg in problems), key=lambda item: item[0])
        raise ConfigError([line for _, line in lines])
    return cfg


def load_registry(path: str | Path) -> RegistryConfig:
    """Read and validate a registry file; relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        msg = f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([msg]) from exc
    return parse_registry(text, str(path), Path(os.path.abspath(path)).parent)
