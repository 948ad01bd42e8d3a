"""The ``coe`` command line. Every command takes ``--config`` (default ``./experts.yaml``).

Errors print one clear message per problem to stderr and exit non-zero; no
traceback for expected failures.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.config import ExpertConfig, RegistryConfig
from coe.errors import CoeError, ConfigError
from coe.loader import load_registry

if TYPE_CHECKING:
    from routers.base import Ask, Completer

DEFAULT_CONFIG = "experts.yaml"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_registry(cfg: RegistryConfig) -> str:
    backends = [[name, "launch" if b.launch else "url", str(b.launch.model if b.launch else b.url)]
                for name, b in cfg.backends.items()]
    experts = [[e.name, e.backend, e.model, e.adapter.name if e.adapter else "-",
                ",".join(e.categories) or "-", f"{e.cost.input_per_mtok:g}/{e.cost.output_per_mtok:g}"]
               for e in cfg.experts]
    out = [_table(backends, ["BACKEND", "KIND", "TARGET"]) if backends else "(no backends)", ""]
    out.append(_table(experts, ["EXPERT", "BACKEND", "MODEL", "ADAPTER", "CATEGORIES", "USD/MTOK IN/OUT"])
               if experts else "(no experts)")
    auth = cfg.auth
    out += ["", f"router: {cfg.router.strategy}; client auth: {'on' if auth.client_auth else 'OFF'}; "
                f"admin auth: {'on' if auth.admin_auth else 'OFF'}"]
    return "\n".join(out)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_registry(args.config)  # the router's strategy is checked here; its classifier is not fitted
    print(describe_registry(cfg))
    print(f"\n{args.config}: ok ({len(cfg.experts)} experts, {len(cfg.backends)} backends)")
    return 0


_READY_TIMEOUT_S = 900.0
"""How long ``coe profile`` and ``coe route`` (annotator mode) wait for the backends they start."""


@contextlib.asynccontextmanager
async def _expert_calls(config_path: str, cfg: RegistryConfig, backends: set[str]) -> AsyncIterator[Ask]:
    """A ``Runtime`` that runs only the named backends (started, when managed, and ready), and an ``Ask``
    that calls experts on them through its dispatcher (retries; no fallback: one expert per call); all
    stopped on exit. It builds no router and keeps state in memory: nothing is served or registered.
    The commands that call experts outside ``serve`` (``profile``, ``route`` with an annotator) use it,
    so the routing code itself never starts a backend."""
    from coe.runtime import Runtime
    from coe.store import MemoryStore

    async with Runtime(config_path, config=cfg, store=MemoryStore(), backends=backends, batches=False,
                       watch=False, routing=False, log_tag="cli") as runtime:
        await runtime.wait_ready(backends, _READY_TIMEOUT_S)

        async def ask(expert: ExpertConfig, body: dict[str, Any], request_id: str) -> tuple[str, dict[str, Any] | None]:
            result, _, call = await runtime.dispatcher.chat([expert], body, request_id=request_id)
            return str(result["choices"][0]["message"].get("content") or ""), call.usage

        yield ask


@contextlib.asynccontextmanager
async def _annotator(config_path: str, cfg: RegistryConfig) -> AsyncIterator[Completer | None]:
    """For ``coe route`` with ``router.skills.mode: annotator``: the annotator's backend, started and
    ready, behind a completer. ``None`` (and no backend touched) in the default embedding mode."""
    name = cfg.router.skills.annotator
    expert = cfg.expert(name) if cfg.router.skills.mode == "annotator" and name else None
    if expert is None:
        yield None
        return
    async with _expert_calls(config_path, cfg, {expert.backend}) as ask:

        async def complete(e: ExpertConfig, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
            text, _ = await ask(e, {"messages": messages, **params}, "route-annotate")
            return text

        yield complete


def cmd_route(args: argparse.Namespace) -> int:
    """Decide for every input line without calling any expert (no backend is started or contacted, except
    the annotator's with ``router.skills.mode: annotator``)."""
    import asyncio
    import json
    import time

    from routers import RouteRequest, make_router
    from routers.decisions import read_inputs, record, summary

    cfg = load_registry(args.config)
    inputs = read_inputs(Path(args.input))  # every line checked before anything is loaded, routed or written
    if not cfg.experts:
        raise ConfigError([f"{args.config}: no experts to route to"])

    async def run() -> list[dict[str, object]]:
        async with _annotator(args.config, cfg) as complete:  # None unless skills.mode is "annotator"
            t0 = time.perf_counter()
            router = await asyncio.to_thread(make_router, cfg, complete)
            loaded[0] = time.perf_counter() - t0
            out: list[dict[str, object]] = []
            for start in range(0, len(inputs), args.batch_size):
                batch = inputs[start:start + args.batch_size]
                requests = [RouteRequest(messages=i.messages, request_id=str(i.id)) for i in batch]
                t0 = time.perf_counter()
                decisions = await router.route_many(requests, cfg.experts)
                each_ms = (time.perf_counter() - t0) * 1000 / len(batch)  # amortized over the batch
                out += [record(i.id, d, each_ms) for i, d in zip(batch, decisions, strict=True)]
            return out

    loaded = [0.0]  # seconds to load (or fit) the router: not part of the routing rate
    started = time.perf_counter()
    records = asyncio.run(run())
    elapsed = time.perf_counter() - started - loaded[0]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output:
        tmp = Path(args.output + ".tmp")
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(args.output)  # never a half-written output file
    else:
        sys.stdout.write(lines)
    print(f"router ready in {loaded[0]:.1f}s; "
          f"{summary(records, elapsed)}", file=sys.stderr)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure every expert on labelled questions; write profiles (JSON) and every scored answer (JSONL)."""
    import asyncio
    import json
    import time

    from coe.logs import configure
    from routers.profiles import ProfileSet
    from routers.profiling import ProfileRun, default_skills_field, read_items, run_profile

    configure("warning")
    cfg = load_registry(args.config)
    items = read_items(Path(args.data), limit=args.limit, seed=args.seed)
    wanted = args.experts.split(",") if args.experts else [e.name for e in cfg.experts]
    unknown = [n for n in wanted if cfg.expert(n) is None]
    if unknown:
        raise ConfigError([f"--experts: unknown expert(s): {', '.join(unknown)}"])
    experts = [e for e in cfg.experts if e.name in wanted]
    field = args.skills or default_skills_field(items)
    print(f"profiling {len(experts)} expert(s) on {len(items)} question(s) from {args.data} "
          f"(skills: {field})", file=sys.stderr)

    async def profile() -> ProfileRun:
        async with _expert_calls(args.config, cfg, {e.backend for e in experts}) as ask:
            return await run_profile(ask, items, skills_field=field, experts=experts, concurrency=args.concurrency,
                                     max_tokens=args.max_tokens, source=str(args.data), aggregation=args.aggregation,
                                     progress=lambda line: print(line, file=sys.stderr))

    started = time.perf_counter()
    run = asyncio.run(profile())
    seconds = time.perf_counter() - started  # backend start-up included
    out = Path(args.output) if args.output else Path(args.config).resolve().parent / ".coe" / "profiles.json"
    profiles = run.profiles
    if args.merge and out.exists():  # keep the other experts' measured profiles
        previous = ProfileSet.load(out)
        previous.experts.update(profiles.experts)
        profiles = previous
    profiles.save(out)
    results = out.with_name(out.stem + "-answers.jsonl")
    results.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run.records), encoding="utf-8")
    scored = [r["chance"] for r in run.records if "chance" in r]
    chance = sum(scored) / max(1, len(scored))
    print(f"\n{'EXPERT':<16} {'ANSWERED':>8} {'CORRECT':>8} {'ACCURACY':>9} {'AGGREGATION':>11}  "
          f"(chance {chance:.3f})")
    for name, p in run.profiles.experts.items():
        agg = "-" if p.aggregation_score is None else f"{p.aggregation_score:.3f}"
        print(f"{name:<16} {p.answered:>8} {p.correct:>8} {p.accuracy or 0:>9.3f} {agg:>11}")
    errors = sum(1 for r in run.records if "error" in r)
    print(f"\nprofiles: {out}\nanswers: {results}\nerrors: {errors}; {seconds:.0f}s", file=sys.stderr)
    return 0 if errors == 0 else 1


def cmd_router_fit(args: argparse.Namespace) -> int:
    """Fit level 1 on labelled data and the registry's descriptions; print what was measured."""
    import json

    from coe.embed import load_embedder
    from routers.fit import fit, write_artifact

    cfg = load_registry(args.config)
    updates: dict[str, object] = {}
    if args.data:
        updates["data"] = Path(args.data).resolve()
        if cfg.router.data is not None and cfg.router.data != updates["data"]:
            print(f"warning: {args.config} names router.data {cfg.router.data}: 'coe serve' and 'coe route' "
                  "will refit from that file unless you change it", file=sys.stderr)
    for key, value in (("label", args.label), ("fine_label", args.fine_label)):
        if value:
            updates[key] = value
    if args.no_choices_view:
        updates["choices_view"] = False
    if args.output:
        updates["artifact"] = Path(args.output).resolve()
    cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update=updates)})
    embedder = load_embedder(cfg.router.embedder)
    result = fit(cfg, embedder, progress=lambda line: print(line, file=sys.stderr))
    assert cfg.router.artifact is not None
    write_artifact(result.classifier, cfg.router.artifact)
    print(json.dumps(result.report, indent=2))
    print(f"artifact: {cfg.router.artifact}", file=sys.stderr)
    return 0


def cmd_rag_ingest(args: argparse.Namespace) -> int:
    import json

    from coe.embed import load_embedder
    from coe.rag import RagIndex

    cfg = load_registry(args.config)
    rag = cfg.rag
    assert rag.folder is not None, "the loader sets rag.folder"
    folder = rag.folder / (args.index or rag.index)
    index = RagIndex.open(folder, load_embedder(rag.embedder))
    report = index.ingest([Path(p) for p in args.paths], chunk_words=rag.chunk_words,
                          overlap_words=rag.overlap_words)
    print(json.dumps(report, indent=2))
    print(f"index: {folder}", file=sys.stderr)
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from coe.models.tiny import build_tiny

    model = build_tiny(Path(args.dir), adapters=args.adapters, seed=args.seed)
    print(f"tiny model: {model.path} (served name {model.served_name})")
    for name, path in model.adapters.items():
        print(f"adapter {name}: {path}")
    return 0


def cmd_build_gemma(args: argparse.Namespace) -> int:
    from coe.models.gemma import build_gemma

    print(f"gemma 3 270m: {build_gemma(Path(args.dir))}")
    return 0


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from coe.models.train import Recipe, train_adapter

    recipe = Recipe(rank=args.rank, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
                    learning_rate=args.lr, seed=args.seed, max_tokens=args.max_tokens, threads=args.threads,
                    targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                    stop=args.stop.encode().decode("unicode_escape"))

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0 or step == recipe.steps - 1:
            print(f"step {step + 1}/{recipe.steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    result = train_adapter(Path(args.base), Path(args.data), Path(args.out), recipe, name=args.name,
                           progress=progress)
    m = result.manifest
    print(f"adapter {m['name']}: {result.path} ({m['data']['examples']} examples, {recipe.steps} steps, "
          f"loss {m['loss'][0]:.3f} -> {m['loss'][-1]:.3f}, {m['wall_time_s']} s, "
          f"{m['step_time_s']['mean']} s/step)")
    return 0


Command = Callable[[argparse.ArgumentParser, Callable[[argparse.Namespace], int]], argparse.ArgumentParser]
"""Adds ``--config`` and the handler to a subcommand's parser."""

Extend = Callable[[Any, Command], None]
"""Adds more subcommands (``services.cli`` adds ``serve``, which needs HTTP)."""


def _parser(extend: Extend | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coe", description="Composition-of-experts gateway for vLLM experts")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(p: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p.add_argument("--config", default=DEFAULT_CONFIG, help="registry file (default: ./experts.yaml)")
        p.set_defaults(fn=fn)
        return p

    if extend is not None:
        extend(sub, command)

    experts = sub.add_parser("experts", help="inspect the registry; build merged experts").add_subparsers(
        dest="experts_command", required=True, metavar="SUBCOMMAND")
    command(experts.add_parser("validate", help="check the registry; print it, or every error (exit 1)"),
            cmd_validate)
    from coe.cli_merge import add_commands as add_merge_command

    add_merge_command(experts, command)

    route = command(sub.add_parser("route", help="route queries without calling any expert"), cmd_route)
    route.add_argument("--input", required=True, help="JSONL: {id, question} or OpenAI batch lines")
    route.add_argument("--output", help="JSONL decisions, one per input line (default: stdout)")
    route.add_argument("--batch-size", type=int, default=64)

    profile = command(sub.add_parser("profile", help="measure experts on labelled questions; write profiles"),
                      cmd_profile)
    profile.add_argument("--data", required=True, help="JSONL with question, answer, choices, labels")
    profile.add_argument("--limit", type=int, help="a seeded random sample of this many questions")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--skills", help="dotted path to each question's skills (default: labels.keywords "
                                          "or labels.subject)")
    profile.add_argument("--experts", help="comma-separated expert names (default: all)")
    profile.add_argument("--output", help="profiles JSON (default: .coe/profiles.json next to the config)")
    profile.add_argument("--concurrency", type=int, default=8)
    profile.add_argument("--max-tokens", type=int, default=16)

    profile.add_argument("--aggregation", type=int, default=20, metavar="N",
                         help="also score each expert as the aggregator of the others' answers on N questions")
    profile.add_argument("--merge", action="store_true",
                         help="update only these experts' profiles in the existing file (a newly registered expert)")

    router = sub.add_parser("router", help="the two-level router's classifier").add_subparsers(
        dest="router_command", required=True, metavar="SUBCOMMAND")
    fit = command(router.add_parser("fit", help="fit the level-1 classifier; write its artifact folder"),
                  cmd_router_fit)
    fit.add_argument("--data", help="labelled JSONL (default: router.data in the config)")
    fit.add_argument("--label", help="dotted path of the category label, e.g. labels.subcategory "
                                     "(default: router.label)")
    fit.add_argument("--fine-label", help="optional finer label the linear head is trained on, e.g. labels.subject")
    fit.add_argument("--output", help="artifact folder (default: router.artifact, .coe/router next to the config)")
    fit.add_argument("--no-choices-view", action="store_true",
                     help="train on questions only, not also on question + choices (halves the time)")

    rag = sub.add_parser("rag", help="retrieval indexes for the composition pipeline").add_subparsers(
        dest="rag_command", required=True, metavar="SUBCOMMAND")
    ingest = command(rag.add_parser("ingest", help="chunk, embed and index text/Markdown files (re-ingest replaces)"),
                     cmd_rag_ingest)
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    ingest.add_argument("--index", help="index name (default: rag.index)")

    from coe.cli_batch import add_commands as add_batch_commands

    add_batch_commands(sub, command)

    from coe.cli_keys import add_commands as add_keys_commands

    add_keys_commands(sub)

    models = sub.add_parser("models", help="build local models offline").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND")
    tiny = command(models.add_parser("build-tiny", help="a tiny random Llama (+ LoRA adapters) for tests"),
                   cmd_build_tiny)
    tiny.add_argument("dir")
    tiny.add_argument("--adapters", type=int, default=0)
    tiny.add_argument("--seed", type=int, default=0)
    gemma = command(models.add_parser("build-gemma", help="Gemma 3 270M (base) from the PyPI GGUF package"),
                    cmd_build_gemma)
    gemma.add_argument("dir")
    train = command(models.add_parser("train-adapter", help="fine-tune a LoRA adapter on chat examples (CPU)"),
                    cmd_train_adapter)
    train.add_argument("data", help='JSONL of {"messages": [...]} chats ending in the answer')
    train.add_argument("--base", default="models/gemma-3-270m", help="base model folder (default: the demo's)")
    train.add_argument("--out", required=True, help="adapter folder (replaced only when training succeeds)")
    train.add_argument("--name", help="adapter name in the manifest (default: the folder's name)")
    for flag, kind, default, text in (
            ("--rank", int, 8, "LoRA rank"), ("--alpha", int, 16, "LoRA alpha"),
            ("--steps", int, 80, "optimizer steps"), ("--batch-size", int, 8, "examples per step"),
            ("--lr", float, 1e-3, "peak learning rate"), ("--seed", int, 0, "seed of the init and the order"),
            ("--max-tokens", int, 192, "longest example, in tokens (longer ones are an error)"),
            ("--threads", int, 2, "torch threads (part of the recipe: results depend on it)")):
        train.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    train.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names")
    train.add_argument("--stop", default="\n\nQuestion:",
                       help="text the expert's stop sequence cuts at, learnt after each answer "
                            "(default: the demo's \"\\n\\nQuestion:\")")
    return parser


def main(argv: Sequence[str] | None = None, *, extend: Extend | None = None) -> int:
    """Run one command; ``coe`` on the PATH is ``services.cli.main``, which adds ``serve`` through
    ``extend`` (the core never imports HTTP)."""
    args = _parser(extend).parse_args(argv)
    try:
        code: int = args.fn(args)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except CoeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # every command but ``serve``; ``python -m services.cli`` has them all
    sys.exit(main())
