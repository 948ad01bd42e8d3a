"""Does composition beat the best single expert? The skill pack's quality benchmark.

    .venv/bin/python bench/quality.py --start            # starts `coe serve` on experts.yaml, <= ~45 min
    .venv/bin/python bench/quality.py --start --quick    # 20 items per skill + part 1, about 10 min

The default takes 100 of part 2's 200 items per skill (``--per-skill 0`` takes all, about 1.5 hours on
2 cores) and gives the k = 3 arms, which cost 4-5 calls a question, the first half of them
(``--composed-per-skill``); ``k3_against_k1`` in the results compares them with k = 1 on those same
questions.
    .venv/bin/python bench/quality.py --base-url http://127.0.0.1:8080/v1   # a running service

Runs both evaluation parts (``bench/data/quality/``, built by ``bench/quality_data.py``) through
the service with the openai SDK, one Batch per arm (so the batch worker groups calls per adapter),
and scores each answer by its task's metric (``examples/pack/tasks.py``). The arms:

- ``base``: the generalist (the base model) on everything;
- ``expert:<name>``: each skill expert alone, on everything;
- ``oracle``: each question sent to its own skill's expert;
- ``coe k=1``, ``coe k=3 vote``, ``coe k=3 synthesize``: ``model="coe"`` with ``coe.k``/``strategy``;
- ``coe (router k)``: the shipped configuration, the router's own k and strategy;
- ``coe level2 off``: the same with ``coe.level2=false`` (level 1 alone ranks).
``--arm-expert NAME`` adds an arm for any registered expert (a merged adapter, for instance).
``--merge METHOD`` (repeatable) builds one adapter merging all four skill experts by that method through
``POST /v1/experts/merge`` and adds it as the arm ``merged:METHOD``; with ``--start`` the service runs on
a copy of ``--config`` whose backend allows the merged ranks. ``--two-skill`` adds the two-skill set
(``two_skill.jsonl``: two questions of two skills in one message, right only when both answers are).

    .venv/bin/python bench/quality.py --start --per-skill 25 --two-skill --per-pair 10 \
        --arms "coe k=1,coe k=3 vote" --merge cat --merge linear --merge ties \
        --merge dare_linear --merge dare_ties     # route vs merge vs compose, ~45 min

For each arm and task: accuracy with n and a 95% Wilson interval, tokens and expert calls per
question, and wall time. Results: ``bench/results/quality-<stamp>.json`` and a chart
``bench/results/quality-<stamp>.png`` (accuracy per arm and skill, part 2, with intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "pack"))

import tasks  # noqa: E402

DATA = ROOT / "bench" / "data" / "quality"
RESULTS = ROOT / "bench" / "results"
SKILL_NAMES = list(tasks.SKILLS)
# Defaults sized to the budget on 2 cores: the whole run in about 45 minutes, --quick in 10.
DEFAULT_PER_SKILL, QUICK_PER_SKILL = 100, 20


@dataclass
class Arm:
    name: str
    model: Callable[[dict[str, Any]], str]
    coe: dict[str, Any] | None = None
    quick: bool = True
    costly: bool = False  # k = 3: three or more calls a question, so run on the composed subset


def arms(extra: Sequence[str]) -> list[Arm]:
    out = [Arm("base", lambda i: "generalist")]
    out += [Arm(f"expert:{s}", lambda i, s=s: s) for s in SKILL_NAMES]  # type: ignore[misc]
    out += [Arm(f"expert:{e}", lambda i, e=e: e) for e in extra]  # type: ignore[misc]
    out += [Arm("oracle", lambda i: str(i["skill"])),
            Arm("coe k=1", lambda i: "coe", {"k": 1}),
            Arm("coe k=3 vote", lambda i: "coe", {"k": 3, "strategy": "vote"}, costly=True),
            Arm("coe k=3 synthesize", lambda i: "coe", {"k": 3, "strategy": "synthesize"}, costly=True),
            Arm("coe (router k)", lambda i: "coe"),
            Arm("coe level2 off", lambda i: "coe", {"level2": False})]
    return out


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: honest at small n and near 0 or 1."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def load(quick: bool, per_skill: int | None, seed: int, two_skill: bool = False,
         per_pair: int | None = None) -> list[dict[str, Any]]:
    items = []
    for part in ("part1", "part2", *(("two",) if two_skill else ())):
        if part == "two":
            rows = [json.loads(x) for x in (DATA / "two_skill.jsonl").read_text(encoding="utf-8").splitlines()]
            if per_pair is not None:
                rng = random.Random(seed)
                rows = [r for pair in sorted({x["skill"] for x in rows})
                        for r in rng.sample([x for x in rows if x["skill"] == pair], per_pair)]
            items += [{**r, "part": "two"} for r in rows]
            continue
        rows = [json.loads(x) for x in (DATA / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()]
        for r in rows:
            r["part"] = part
        if part == "part2":
            limit = per_skill if per_skill is not None else (QUICK_PER_SKILL if quick else DEFAULT_PER_SKILL)
            if limit:
                rng = random.Random(seed)
                rows = [r for s in SKILL_NAMES for r in rng.sample([x for x in rows if x["skill"] == s],
                                                                   min(limit, sum(x["skill"] == s for x in rows)))]
        items += rows
    return items


# --------------------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(config: Path, timeout_s: float) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    log = ROOT / ".coe" / "quality-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    coe = ROOT / ".venv" / "bin" / "coe"
    proc = subprocess.Popen([str(coe), "serve", "--config", str(config), "--port", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"coe serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=5).status_code == 200:
                return proc, f"{base}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(3)
    stop_service(proc)
    raise SystemExit(f"coe serve was not ready after {timeout_s:.0f} s; see {log}")


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def body(arm: Arm, item: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    text = item.get("prompt") or tasks.prompt(item)
    out: dict[str, Any] = {"model": arm.model(item), "messages": [{"role": "user", "content": text}],
                           "max_tokens": max_tokens, "temperature": 0}
    if arm.coe:
        out["coe"] = arm.coe
    return out


def run_arm(client: Any, arm: Arm, items: list[dict[str, Any]], max_tokens: int,
            poll_s: float = 2.0) -> tuple[dict[str, dict[str, Any]], float]:
    """One Batch for the arm; returns each item's response body (or error) by id, and the wall time."""
    lines = [json.dumps({"custom_id": it["id"], "method": "POST", "url": "/v1/chat/completions",
                         "body": body(arm, it, max_tokens)}) for it in items]
    started = time.monotonic()
    upload = client.files.create(file=("quality.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"bench": "quality", "arm": arm.name})
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch.id)
    wall = time.monotonic() - started
    if batch.status != "completed":
        raise SystemExit(f"arm {arm.name}: batch {batch.id} ended {batch.status}: {batch.errors}")
    out: dict[str, dict[str, Any]] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        for line in client.files.content(file_id).text.splitlines():
            row = json.loads(line)
            resp = row.get("response") or {}
            out[row["custom_id"]] = resp.get("body") if resp.get("status_code") == 200 else \
                {"error": row.get("error") or resp.get("body")}
    return out, wall


def merged_name(method: str) -> str:
    return f"merged-{method.replace('_', '-')}"


MERGED_SYSTEM_PROMPT = "Below are questions, each followed by a short, correct answer."
"""The merged experts' system prompt: each source was trained with its own, so a merge of all four gets
the neutral one the generalist uses (giving it a skill's prompt per question would be routing)."""


def merge_config(config: Path, stamp: str) -> Path:
    """A copy of ``config`` beside it (so relative paths still resolve) whose managed backend allows
    rank 32 (cat of four rank-8 adapters) and a merged adapter in each batch beside the skills, and
    whose first adapter root is a fresh folder for this run's merged adapters."""
    import yaml

    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    for backend in doc["backends"].values():
        launch = backend.get("launch")
        if launch is not None and launch.get("lora_modules"):
            launch["max_lora_rank"] = max(32, int(launch.get("max_lora_rank", 8)))
            launch["max_loras"] = int(launch.get("max_loras", 2)) + 1
            launch["max_cpu_loras"] = int(launch["max_loras"]) + 8
            backend["adapter_roots"] = [f".coe/merged/{stamp}", *backend.get("adapter_roots", [])]
    out = config.with_name(f".quality-merge-{stamp}.yaml")
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


def create_merged(base_url: str, method: str, density: float, rank: int | None, stamp: str) -> dict[str, Any]:
    """Build and register one merged expert through the admin API; returns its manifest."""
    import httpx

    body: dict[str, Any] = {"name": merged_name(method), "from": SKILL_NAMES, "method": method,
                            "system_prompt": MERGED_SYSTEM_PROMPT}
    if method in ("ties", "dare_linear", "dare_ties"):
        body["density"] = density
    if rank is not None and method != "cat":
        body["rank"] = rank
    key = os.environ.get("COE_ADMIN_KEY", "unused")
    started = time.monotonic()
    r = httpx.post(f"{base_url}/experts/merge", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=900)
    if r.status_code != 201:
        raise SystemExit(f"merge {method} failed: HTTP {r.status_code}: {r.text[:500]}")
    manifest: dict[str, Any] = r.json()["merge"]
    print(f"merged:{method}: rank {manifest['merge']['rank']}, reconstruction error "
          f"max {manifest['reconstruction_error']['relative_frobenius_max']:.3f} "
          f"mean {manifest['reconstruction_error']['relative_frobenius_mean']:.3f}, "
          f"{time.monotonic() - started:.0f} s", flush=True)
    manifest["reconstruction_error"].pop("per_module", None)
    return {**manifest, "request": body, "seconds": round(time.monotonic() - started, 1)}


# --------------------------------------------------------------------------------------- scoring


def score(items: list[dict[str, Any]], answers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for it in items:
        resp = answers.get(it["id"]) or {"error": "missing"}
        text = None
        if "error" not in resp:
            text = (resp.get("choices") or [{}])[0].get("message", {}).get("content")
        coe = resp.get("coe") or {}
        usage = coe.get("usage") or resp.get("usage") or {}
        calls = len([c for c in coe.get("experts", []) if c.get("outcome", "ok") == "ok"]) if coe else 1
        halves = None
        if it["part"] == "two":  # each half right when some line of the answer is right for it
            lines = [ln for ln in (text or "").splitlines() if ln.strip()]
            halves = [any(tasks.correct(p, ln) for ln in lines) for p in it["parts"]]
        rows.append({"id": it["id"], "part": it["part"], "skill": it["skill"], "task": it["source_task"],
                     "answer": text, "correct": all(halves) if halves is not None else tasks.correct(it, text),
                     "halves": halves, "error": resp.get("error"),
                     "tokens": int(usage.get("total_tokens") or 0), "calls": calls or (0 if text is None else 1),
                     "experts": [c.get("name") for c in coe.get("experts", [])] if coe else None})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def acc(sel: list[dict[str, Any]]) -> dict[str, Any]:
        n, c = len(sel), sum(r["correct"] for r in sel)
        return {"n": n, "correct": c, "accuracy": round(c / n, 4) if n else None, "ci95": wilson(c, n),
                "tokens_per_q": round(sum(r["tokens"] for r in sel) / n, 1) if n else None,
                "calls_per_q": round(sum(r["calls"] for r in sel) / n, 3) if n else None,
                "errors": sum(1 for r in sel if r["error"])}

    out: dict[str, Any] = {}
    for part in ("part1", "part2"):
        sel = [r for r in rows if r["part"] == part]
        out[part] = {"all": acc(sel), **{s: acc([r for r in sel if r["skill"] == s]) for s in SKILL_NAMES}}
    two = [r for r in rows if r["part"] == "two"]
    if two:
        halves = [h for r in two for h in (r["halves"] or [False, False])]
        out["two"] = {"all": acc(two), "halves_right": round(sum(halves) / len(halves), 4),
                      **{pair: acc([r for r in two if r["skill"] == pair])
                         for pair in sorted({r["skill"] for r in two})}}
    return out


def composed_subset(items: list[dict[str, Any]], per_skill: int | None) -> list[dict[str, Any]]:
    """The items of the k = 3 arms: every part-1 and two-skill item, and the first ``per_skill`` part-2
    items of each skill (half of the others' by default). A subset of the k = 1 arm's items, so that
    ``k3_against_k1`` compares the two on the same questions."""
    part2 = [i for i in items if i["part"] == "part2"]
    if per_skill is None:
        per_skill = max(1, max((sum(i["skill"] == s for i in part2) for s in SKILL_NAMES), default=0) // 2)
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if it["part"] == "part2":
            seen[it["skill"]] = seen.get(it["skill"], 0) + 1
            if seen[it["skill"]] > per_skill:
                continue
        out.append(it)
    return out


def k3_against_k1(all_rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each k = 3 arm against k = 1 on the same questions, per part and skill: accuracy gained and the
    cost paid for it (expert calls and tokens, as ratios). Composition that costs 3x and gains nothing
    shows here."""
    k1 = {r["id"]: r for r in all_rows["coe k=1"]}
    out: dict[str, Any] = {}
    for arm in ("coe k=3 vote", "coe k=3 synthesize"):
        rows = [r for r in all_rows.get(arm, []) if r["id"] in k1]
        if not rows:
            continue
        per: dict[str, Any] = {}
        for part in ("part1", "part2"):
            for skill in ("all", *SKILL_NAMES):
                sel = [r for r in rows if r["part"] == part and (skill == "all" or r["skill"] == skill)]
                if not sel:
                    continue
                base = [k1[r["id"]] for r in sel]
                n, right3, right1 = len(sel), sum(r["correct"] for r in sel), sum(r["correct"] for r in base)
                per[f"{part}/{skill}"] = {
                    "n": n, "k1_accuracy": round(right1 / n, 4), "k3_accuracy": round(right3 / n, 4),
                    "gain_points": round(100 * (right3 - right1) / n, 1),
                    "calls_ratio": round(sum(r["calls"] for r in sel) / max(1, sum(r["calls"] for r in base)), 2),
                    "tokens_ratio": round(sum(r["tokens"] for r in sel) / max(1, sum(r["tokens"] for r in base)), 2)}
        out[arm] = per
    return out


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed (never asserted): routed vs the best single expert and the oracle."""
    arms_ = results["arms"]
    singles = {a: v for a, v in arms_.items() if a in {f"expert:{s}" for s in SKILL_NAMES} or a == "base"}
    out: dict[str, Any] = {}
    for part in ("part1", "part2") if singles else ():
        best = max(singles, key=lambda a: singles[a]["summary"][part]["all"]["accuracy"] or 0)
        best_acc = singles[best]["summary"][part]["all"]["accuracy"] or 0
        oracle = arms_["oracle"]["summary"][part]["all"]
        part_out: dict[str, Any] = {"best_single": best, "best_single_accuracy": best_acc,
                                    "oracle_accuracy": oracle["accuracy"]}
        for name in ("coe (router k)", "coe k=1"):
            if name not in arms_:
                continue
            a = arms_[name]["summary"][part]["all"]
            lo, hi = a["ci95"]
            part_out[name] = {"accuracy": a["accuracy"],
                              "minus_best_single_points": round(100 * ((a["accuracy"] or 0) - best_acc), 1),
                              "minus_oracle_points": round(100 * ((a["accuracy"] or 0) - (oracle["accuracy"] or 0)), 1),
                              "oracle_inside_ci": lo <= (oracle["accuracy"] or 0) <= hi}
        out[part] = part_out
    merged = {a: v for a, v in arms_.items() if a.startswith("merged:")}
    if merged:  # route vs merge vs compose, per set
        def acc_of(arm: str, part: str) -> float | None:
            summary = arms_.get(arm, {}).get("summary", {}).get(part)
            return summary["all"]["accuracy"] if summary else None

        out["route_merge_compose"] = {
            part: {"route (coe k=1)": acc_of("coe k=1", part), "compose (coe k=3 vote)": acc_of("coe k=3 vote", part),
                   "compose (coe k=3 synthesize)": acc_of("coe k=3 synthesize", part),
                   **{arm: acc_of(arm, part) for arm in merged}}
            for part in ("part1", "part2", "two")}
    return out


# ----------------------------------------------------------------------------------------- chart


def _font(size: int, bold: bool = False) -> Any:
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        if (Path(folder) / name).exists():
            return ImageFont.truetype(str(Path(folder) / name), size)
    return ImageFont.load_default(size=size)


def chart(results: dict[str, Any], path: Path, part: str = "part2") -> None:
    """Grouped bars: one group per arm, one bar per skill plus 'all'; whiskers are the 95% interval."""
    from PIL import Image, ImageDraw

    groups = list(results["arms"])
    series = [*SKILL_NAMES, "all"]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (60, 60, 60)]
    bar, gap, left, top, plot_h, bottom = 14, 22, 60, 80, 320, 150
    width = left + len(groups) * (len(series) * bar + gap) + 40
    img = Image.new("RGB", (width, top + plot_h + bottom), "white")
    d = ImageDraw.Draw(img)
    d.text((12, 10), f"Skill pack quality, {part}: accuracy per arm and skill (95% CI)", fill="black",
           font=_font(18, True))
    d.text((12, 38), results["command"], fill=(90, 90, 90), font=_font(11))
    for tick in range(0, 101, 20):
        y = top + plot_h - plot_h * tick / 100
        d.line((left, y, width - 20, y), fill=(230, 230, 230))
        d.text((left - 36, y - 7), f"{tick}%", fill=(90, 90, 90), font=_font(11))
    for g, arm in enumerate(groups):
        x0 = left + g * (len(series) * bar + gap) + gap / 2
        summary = results["arms"][arm]["summary"][part]
        for s, name in enumerate(series):
            a = summary[name]
            if a["accuracy"] is None:
                continue
            x = x0 + s * bar
            y = top + plot_h - plot_h * a["accuracy"]
            d.rectangle((x, y, x + bar - 2, top + plot_h), fill=colours[s])
            lo, hi = a["ci95"]
            cx = x + bar / 2 - 1
            d.line((cx, top + plot_h - plot_h * lo, cx, top + plot_h - plot_h * hi), fill="black")
        label = Image.new("RGBA", (int(d.textlength(arm, font=_font(12))) + 4, 16), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), arm, fill="black", font=_font(12))
        rotated = label.rotate(55, expand=True)
        img.paste(rotated, (int(x0 + len(series) * bar / 2 - rotated.width + 4), top + plot_h + 6), rotated)
    for s, name in enumerate(series):
        x = left + s * 110
        d.rectangle((x, 58, x + 12, 70), fill=colours[s])
        d.text((x + 16, 56), name, fill="black", font=_font(12))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="a running coe (its /v1)")
    parser.add_argument("--start", action="store_true", help="start `coe serve` on --config for the run")
    parser.add_argument("--config", default=str(ROOT / "experts.yaml"))
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_PER_SKILL} part-2 items per skill, and part 1 (about 10 min)")
    parser.add_argument("--per-skill", type=int,
                        help=f"part-2 items per skill (default {DEFAULT_PER_SKILL}; 0: all 200)")
    parser.add_argument("--composed-per-skill", type=int,
                        help="part-2 items per skill for the k=3 arms, the first of the others' "
                             "(default: half of --per-skill; they cost 4-5 calls a question)")
    parser.add_argument("--arms", help="comma-separated arm names to run (default: all)")
    parser.add_argument("--arm-expert", action="append", default=[], metavar="NAME",
                        help="also run this registered expert alone (e.g. a merged adapter)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--two-skill", action="store_true", help="add the two-skill set (bench/data/quality)")
    parser.add_argument("--per-pair", type=int, help="two-skill items per pair of skills (default: all 20)")
    parser.add_argument("--merge", action="append", default=[], metavar="METHOD",
                        help="merge the four skill experts by METHOD and add the arm merged:METHOD (repeatable)")
    parser.add_argument("--merge-density", type=float, default=0.5, help="density of ties and dare_* (default 0.5)")
    parser.add_argument("--merge-rank", type=int, help="rank of the SVD methods (default: the largest source rank)")
    parser.add_argument("--smoke", action="store_true", help="3 items per part: checks the run end to end")
    args = parser.parse_args()
    from openai import OpenAI

    items = load(args.quick, args.per_skill, args.seed, args.two_skill, args.per_pair)
    if args.smoke:
        items = [i for part in ("part1", "part2", "two") for i in [x for x in items if x["part"] == part][:3]]
    chosen = [a for a in arms(args.arm_expert) if not args.arms or a.name in args.arms.split(",")]
    composed = composed_subset(items, args.composed_per_skill)
    chosen += [Arm(f"merged:{m}", lambda i, m=m: merged_name(m)) for m in args.merge]  # type: ignore[misc]
    proc = None
    base_url = args.base_url
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    config = Path(args.config)
    if args.start and args.merge:
        config = merge_config(config, stamp)
    if args.start:
        proc, base_url = start_service(config, args.ready_timeout)
    client = OpenAI(base_url=base_url, api_key=os.environ.get("COE_API_KEY", "unused"), timeout=600)
    merges: dict[str, Any] = {}
    results: dict[str, Any] = {
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]), "stamp": stamp,
        "items": {part: sum(i["part"] == part for i in items) for part in ("part1", "part2", "two")},
        "composed_items": {part: sum(i["part"] == part for i in composed) for part in ("part1", "part2", "two")},
        "arms": {}}
    all_rows = {}
    try:
        for method in args.merge:
            merges[method] = create_merged(base_url, method, args.merge_density, args.merge_rank, stamp)
        results["merges"] = merges
        for arm in chosen:
            arm_items = [i for i in (composed if arm.costly else items)
                         if not (arm.name == "oracle" and i["part"] == "two")]
            answers, wall = run_arm(client, arm, arm_items, args.max_tokens)
            rows = score(arm_items, answers)
            all_rows[arm.name] = rows
            summary = summarize(rows)
            results["arms"][arm.name] = {"coe": arm.coe, "wall_s": round(wall, 1), "summary": summary}
            p1, p2 = summary["part1"]["all"], summary["part2"]["all"]
            print(f"{arm.name:22s} part2 {p2['accuracy']:.3f} {p2['ci95']} n={p2['n']}  part1 {p1['accuracy']:.3f} "
                  f"n={p1['n']}  calls/q {p2['calls_per_q']}  tokens/q {p2['tokens_per_q']}  {wall:.0f}s  "
                  + " ".join(f"{s}={summary['part2'][s]['accuracy']}" for s in SKILL_NAMES)
                  + (f"  two-skill {summary['two']['all']['accuracy']} (halves {summary['two']['halves_right']})"
                     if "two" in summary else ""), flush=True)
    finally:
        if proc is not None:
            stop_service(proc)
        if config != Path(args.config):
            config.unlink(missing_ok=True)
    if {"oracle"} <= set(results["arms"]):
        results["verdict"] = verdict(results)
        print(json.dumps(results["verdict"], indent=2))
    if "coe k=1" in all_rows:
        results["k3_against_k1"] = k3_against_k1(all_rows)
        for arm, per in results["k3_against_k1"].items():
            print(f"{arm} against k=1 on the same questions: " + "; ".join(
                f"{key} {v['gain_points']:+.1f} pts at {v['calls_ratio']}x calls" for key, v in per.items()))
    out = RESULTS / f"quality-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"quality-{stamp}-answers.jsonl").write_text(
        "".join(json.dumps({"arm": a, **r}) + "\n" for a, rows in all_rows.items() for r in rows))
    chart(results, RESULTS / f"quality-{stamp}.png")
    print(f"results: {out.relative_to(ROOT)}; chart: bench/results/quality-{stamp}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
